"""Write tunesmith's demo datasets: customer support for Northwind Cycles, a made-up online bike and
outdoor gear shop, as one small dataset per task kind (chat, completion, classification, tagging, chat
with tool calls, and preference pairs and thumbs on the chat task's replies).

Everything comes from templates and word lists below, drawn with `random.Random(SEED)`: stdlib only, no
network, and the same bytes on every run and machine. Texts are deduplicated across train and test.

    .venv/bin/python examples/make_data.py --force          # rewrite examples/data/
    .venv/bin/python examples/make_data.py --out /tmp/data  # write somewhere else
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
import re
import sys
from pathlib import Path
from typing import Callable

SEED = 1719
DEFAULT_OUT = Path(__file__).resolve().parent / "data"

# ---------------------------------------------------------------------------------------------------------
# the shop's world, shared by every dataset
# ---------------------------------------------------------------------------------------------------------

# (brand, model, kind, group). Bikes are named without their kind ("Trek Marlin 7").
PRODUCTS = [
    ("Trek", "Marlin 7", "bike", "bike"), ("Trek", "Checkpoint ALR 5", "bike", "bike"),
    ("Specialized", "Rockhopper Comp", "bike", "bike"), ("Specialized", "Diverge E5", "bike", "bike"),
    ("Giant", "Talon 2", "bike", "bike"), ("Giant", "Contend AR 3", "bike", "bike"),
    ("Cannondale", "Topstone 3", "bike", "bike"), ("Santa Cruz", "Chameleon", "bike", "bike"),
    ("Canyon", "Grizl 7", "bike", "bike"), ("Kona", "Rove DL", "bike", "bike"),
    ("Marin", "Rift Zone 2", "bike", "bike"), ("Surly", "Bridge Club", "bike", "bike"),
    ("Northwind", "Trailhead 29", "bike", "bike"), ("Northwind", "Commuter 8", "bike", "bike"),
    ("Shimano", "Deore M6100", "rear derailleur", "part"), ("Shimano", "SLX M7100", "cassette", "part"),
    ("Shimano", "105 R7000", "shifters", "part"), ("Shimano", "XT M8100", "brakes", "part"),
    ("SRAM", "GX Eagle", "derailleur", "part"), ("SRAM", "Rival AXS", "groupset", "part"),
    ("RockShox", "Pike Ultimate", "fork", "part"), ("Fox", "34 Rhythm", "fork", "part"),
    ("Maxxis", "Minion DHF", "tire", "part"), ("Continental", "Grand Prix 5000", "tire", "part"),
    ("Schwalbe", "Marathon Plus", "tire", "part"), ("DT Swiss", "XR 1700", "wheelset", "part"),
    ("Crankbrothers", "Stamp 7", "pedals", "part"), ("WTB", "Volt", "saddle", "part"),
    ("KMC", "X12", "chain", "part"),
    ("Giro", "Syntax MIPS", "helmet", "wear"), ("Bell", "Falcon XRV", "helmet", "wear"),
    ("POC", "Ventral Air", "helmet", "wear"), ("Patagonia", "Nano Puff", "jacket", "wear"),
    ("Endura", "Hummvee", "shorts", "wear"), ("Castelli", "Entrata", "jersey", "wear"),
    ("Osprey", "Talon 22", "backpack", "gear"), ("Ortlieb", "Back-Roller Classic", "panniers", "gear"),
    ("Big Agnes", "Copper Spur HV UL2", "tent", "gear"), ("MSR", "PocketRocket 2", "stove", "gear"),
    ("Black Diamond", "Spot 400", "headlamp", "gear"), ("Therm-a-Rest", "NeoAir XLite", "sleeping pad", "gear"),
    ("Garmin", "Edge 530", "bike computer", "gear"), ("Topeak", "JoeBlow Sport", "floor pump", "gear"),
    ("Kryptonite", "Evolution Mini-7", "U-lock", "gear"), ("Lezyne", "Micro Drive 800", "front light", "gear"),
    ("Thule", "EasyFold XT 2", "bike rack", "gear"), ("CamelBak", "Podium", "bottle", "gear"),
]
BRANDS = sorted({p[0] for p in PRODUCTS} - {"Northwind"})
CITIES = ["Portland", "Boulder", "Salt Lake City", "San Diego", "Fort Collins", "Santa Fe", "Grand Junction",
          "Bend", "Boise", "Missoula", "Flagstaff", "Asheville", "Durango", "Moab", "Burlington", "Duluth",
          "Eugene", "Tacoma", "San Luis Obispo", "Lake Placid", "Colorado Springs", "St. George", "Hood River",
          "Bozeman", "Chattanooga", "Madison", "Santa Cruz", "Ann Arbor", "Sun Valley", "Bentonville"]
NAMES = ["Maya", "Jordan", "Priya", "Tom", "Lucía", "Ahmed", "Sarah", "Kenji", "Olivia", "Marcus", "Ines",
         "Dave", "Chloe", "Ravi", "Hannah", "Mateo", "Grace", "Nikolai", "Aisha", "Ben", "Fatima", "Liam",
         "Sofia", "Wei", "Erin", "Diego", "Noor", "Pete", "Camille", "Jamal"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
COLORS = ["black", "matte black", "white", "red", "olive green", "navy blue", "orange", "gray", "teal"]
CARRIERS = ["UPS", "FedEx", "USPS", "DHL"]
STREETS = ["Alder", "Maple", "Juniper", "Canyon", "Ridge", "Willow", "Aspen", "Summit", "Cedar", "Lakeview"]


def order_id(rng: random.Random) -> str:
    return f"NW-{rng.randrange(10000, 100000)}"


def product_name(rng: random.Random, groups: str = "bike part wear gear") -> str:
    """A product as customers name it: with or without the brand, and the kind after parts and gear."""
    brand, model, kind, group = rng.choice([p for p in PRODUCTS if p[3] in groups.split()])
    name = model if rng.random() < 0.35 else f"{brand} {model}"
    if group != "bike" and rng.random() < 0.7:
        name = f"{name} {kind}"
    return name


def _cap(sentence: str) -> str:
    return sentence[:1].upper() + sentence[1:]


def _ordinal(day: int) -> str:
    return f"{day}{'th' if 4 <= day % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(day % 10, 'th')}"


def _greet(greeting: str, text: str) -> str:
    """"Hi," + "When will..." -> "Hi, when will...": after a comma the sentence goes on in lower case,
    unless it starts with "I" or an acronym ("UPS says...")."""
    if not greeting:
        return text
    first = text.split(" ", 1)[0]
    if greeting.endswith(",") and not (first.isupper() or re.match(r"I\b", first)):
        text = text[:1].lower() + text[1:]
    return f"{greeting} {text}"


def _typo(text: str, rng: random.Random) -> str:
    """One slip of the finger (swapped, dropped or doubled letter) in a word of four letters or more."""
    words = list(re.finditer(r"[A-Za-z]{4,}", text))
    if not words:
        return text
    m = rng.choice(words)
    w, i = m.group(), rng.randrange(1, len(m.group()) - 1)
    w = rng.choice([w[:i] + w[i + 1] + w[i] + w[i + 2:], w[:i] + w[i + 1:], w[:i] + w[i] + w[i:]])
    return text[:m.start()] + w + text[m.end():]


def _casual(text: str, rng: random.Random) -> str:
    """How people actually type: sometimes all lower case, a typo, no apostrophes, no final full stop."""
    if rng.random() < 0.12:
        text = text.lower()
    if rng.random() < 0.18:
        text = _typo(text, rng)
    if rng.random() < 0.08:
        text = re.sub(r"(?<=[A-Za-z])'(?=[A-Za-z])", "", text)  # "I'm" -> "Im", but 5'7" stays
    if rng.random() < 0.12 and text.endswith("."):
        text = text[:-1]
    return text


def _unique(make: Callable[[random.Random, int], dict], n: int, key: Callable[[dict], str],
            rng: random.Random) -> list[dict]:
    """n rows from make(rng, i) whose key() texts are all different; a duplicate is drawn again with the same
    i, so whatever make() derives from i (the label, cycled for balance) keeps its share."""
    seen: set[str] = set()
    rows: list[dict] = []
    tries = 0
    while len(rows) < n:
        row = make(rng, len(rows))
        if key(row) not in seen:
            seen.add(key(row))
            rows.append(row)
        elif (tries := tries + 1) > 20 * n:
            raise RuntimeError(f"templates too few for {n} distinct texts; add templates or vocabulary")
    return rows


def _split(rows: list[dict], n_test: int, rng: random.Random) -> tuple[list[dict], list[dict]]:
    rows = rows[:]
    rng.shuffle(rows)
    return rows[n_test:], rows[:n_test]


def _slots(rng: random.Random) -> dict[str, str]:
    """Values for every {slot} the chat and ticket templates use; a template takes the ones it names."""
    month, day = rng.choice(MONTHS), rng.randrange(1, 29)
    return {
        "product": "the " + product_name(rng), "product_bare": product_name(rng),
        "bike2_bare": product_name(rng, "bike"), "bike": "the " + product_name(rng, "bike"),
        "bike_bare": product_name(rng, "bike"), "part": "the " + product_name(rng, "part"),
        "part_bare": product_name(rng, "part"), "wear": "the " + product_name(rng, "wear"),
        "wear_bare": product_name(rng, "wear"), "gear": "the " + product_name(rng, "gear"),
        "gear_bare": product_name(rng, "gear"),
        "city": rng.choice(CITIES), "name": rng.choice(NAMES), "carrier": rng.choice(CARRIERS),
        "color": rng.choice(COLORS), "days": str(rng.randrange(3, 16)),
        "amount": f"{rng.randrange(9, 400)}.{rng.choice(['00', '99', '49', '95'])}",
        "size": rng.choice(["S", "M", "L", "XL", "medium", "large", "small", "54 cm", "56 cm"]),
        "height": rng.choice(["5'7\"", "5'11\"", "6'2\"", "5'4\"", "172 cm", "185 cm", "about 6 foot", "163cm"]),
        "when_past": rng.choice(["yesterday", "last week", "on Monday", "two weeks ago", f"on {month} {day}",
                                 "last Friday", "a few days ago", f"on the {_ordinal(day)}", "over a week ago"]),
        "when_future": rng.choice(["by Friday", "this weekend", "next week", f"before {month} {day}",
                                   "by Saturday", f"by the {_ordinal(day)}"]),
        "since": rng.choice(["yesterday", "Monday", "last week", f"{month} {day}", "Friday", "the weekend"]),
        "address": (f"{rng.randrange(12, 9800)} {rng.choice(STREETS)} {rng.choice(['St', 'Ave', 'Rd', 'Dr', 'Lane'])}"
                    + rng.choice(["", f" Apt {rng.randrange(1, 40)}", f", Unit {rng.randrange(1, 9)}"])
                    + f", {rng.choice(CITIES)}" + rng.choice(["", f" {rng.randrange(10000, 99999)}"])),
    }


# ---------------------------------------------------------------------------------------------------------
# 1. support-chat: route a message to an intent and copy its order id (chat SFT, scored by exact match)
# ---------------------------------------------------------------------------------------------------------

INTENTS = ("refund", "order_status", "damaged_item", "change_address", "product_question", "cancel_order")
SYSTEM_PROMPT = ("You are the Northwind Cycles support router. Reply with JSON only: "
                 '{"intent": ..., "order_id": ...}. intent is one of ' + ", ".join(INTENTS) + ". order_id is "
                 "the order number in the message (like NW-12345), or null if there is none.")

# The id is written as ID while the message is roughed up (lower case, typos), then put back verbatim.
ID = "\x00"
ORDER_WITH_ID = ["order " + ID, "my order " + ID, "order #" + ID, "order no. " + ID, "#" + ID, ID,
                 "order number " + ID, "my order #" + ID]
ORDER_WITHOUT_ID = ["my order", "my last order", "my recent order", "the order I placed {when_past}",
                    "my {product_bare} order", "my online order"]
ID_SENTENCES = ["My order number is " + ID + ".", "Order: " + ID, "Order number " + ID + ".",
                "(order " + ID + ")", "Ref: #" + ID, "It's order " + ID + ".", "Order #" + ID + " if that helps.",
                "The order number is " + ID + "."]

# Each intent has cue words in every core sentence ("refund", "cancel", "cracked"), phrased many ways,
# so that the mapping is learnable; `extra` sentences add context without contradicting the intent.
CHAT = {
    "refund": dict(id_rate=0.65, core=[
        "I returned {product} {when_past} and still haven't seen the refund for {order}.",
        "Can I get my money back for {order}?", "I'd like a refund for {order}, please.",
        "Please refund {order}.", "When will the refund for {order} show up on my card?",
        "I sent {product} back {when_past}, how long does the refund take?",
        "Still waiting on my refund for {order}.",
        "You received my return for {order} {days} days ago but there's no refund yet.",
        "I want to return {product} from {order} and get a full refund.",
        "How do I get reimbursed for {order}?", "The refund for {order} was only partial, I paid ${amount}.",
        "Can you send the refund for {order} to my PayPal instead of the card?",
        "I'd like my money back on {product}, it's unused and still in the box.",
        "Requesting a refund on {order}.", "Where is my refund for {order}? It's been {days} days."],
        extra=["It doesn't fit.", "It's the wrong size for me.", "Turns out I don't need it.",
               "It wasn't what I expected.", "My partner bought me the same one.",
               "The color looks different from the website.", "The return tracking says you got it.",
               "I dropped it off at the {carrier} store {when_past}."]),
    "order_status": dict(id_rate=0.7, core=[
        "Where is {order}?", "Any update on {order}? It's been {days} days.",
        "Tracking for {order} hasn't moved since {since}.", "Has {order} shipped yet?",
        "When will {order} arrive?", "Can you check the status of {order}?",
        "I ordered {product} {when_past} and still haven't got a shipping confirmation.",
        "The {carrier} tracking for {order} just says label created.",
        "Is {order} still on track to arrive {when_future}?", "What's the ETA on {order}?",
        "{order} was supposed to be here {when_past}, where is it?",
        "Has {product} in {order} left the warehouse?", "No tracking number yet for {order}, is it coming?",
        "How long until {order} ships?", "Could you tell me when {order} will be delivered?"],
        extra=["I need it {when_future}.", "It's a birthday present.", "We leave on a trip {when_future}.",
               "I'm in {city} if that matters.", "This is my second time asking."]),
    "damaged_item": dict(id_rate=0.6, core=[
        "{order} arrived today but {product} is {damage}.",
        "The box was crushed and {product} inside is {damage}.", "My {product_bare} showed up {damage}.",
        "Just unpacked {order} and the {piece} is {damage}.",
        "{product} from {order} came {damage}, can you send a replacement?",
        "Opened {order} this morning and {product} is {damage}.",
        "The {piece} on {product} was {damage} straight out of the box.",
        "Got {order} but it looks like it was dropped, {product} is {damage}.",
        "Part of {order} is damaged: {product} is {damage}.",
        "{product} I received is {damage}, not usable like this.",
        "Delivery of {order} came with the {piece} {damage}."],
        extra=["I've attached a couple of photos.", "Can you send a replacement?",
               "The packaging looked fine from the outside.", "I haven't even used it.", "What's the next step?",
               "Really disappointed, it was a gift."]),
    "change_address": dict(id_rate=0.7, core=[
        "I need to change the shipping address on {order}.",
        "I just moved to {city}, can you update the delivery address for {order}?",
        "Please ship {order} to {address} instead.", "Wrong address on {order}, it should go to {address}.",
        "Can I redirect {order} to my work address? It's {address}.",
        "Could you change the address for {order} to {address}?",
        "I typed my old address on {order} by mistake.",
        "Please update the delivery address on {order}, I'm staying in {city} until {when_future}.",
        "The street number on {order} is wrong, it should be {number}.",
        "Can {order} be delivered to my new place in {city}?",
        "Change of address for {order}: {address}."],
        extra=["I won't be at the old place anymore.", "Sorry for the hassle!",
               "The buzzer code is {number}.", "My phone is 555-01{days}."]),
    "product_question": dict(id_rate=0.05, core=[
        "Does {part} fit {spec}?", "Is {part} compatible with {spec}?",
        "What size {bike_bare} should I get? I'm {height}.", "Do you have {wear} in {color}?",
        "How much does {gear} weigh?", "Is {gear} waterproof?", "Will {product} be back in stock soon?",
        "What's the difference between the {bike_bare} and the {bike2_bare}?",
        "Does {bike} come with pedals?", "Can I fit a rear rack on {bike}?",
        "Does {wear} run small or true to size?", "Is {gear} any good for bikepacking?",
        "What's the max tire width on {bike}?",
        "Quick question about {product} from {order}: does it come with a manual?",
        "I bought {gear} in {order}, does it have a warranty?",
        "Does {part} work with {spec}?"],
        extra=["I'm pretty new to this.", "I ride mostly gravel.", "I'm about {height}.",
               "I commute about 20 miles a day.", "I'm doing a tour in {city} {when_future}."]),
    "cancel_order": dict(id_rate=0.7, core=[
        "Please cancel {order}.", "I want to cancel {order}, I ordered the wrong size.",
        "Can you cancel {order} before it ships?", "I changed my mind about {product}, please cancel {order}.",
        "I accidentally ordered twice, please cancel {order}.", "Is it too late to cancel {order}?",
        "Cancel {order} please, I found one locally.",
        "I'd like to cancel {order} and not have it shipped.", "Could you cancel {order}? I don't need it anymore.",
        "Please void {order}, I placed it by mistake.", "Need to cancel {order} asap.",
        "How do I cancel {order}?"],
        extra=["Sorry about that.", "I found it cheaper at a shop in {city}.", "It hasn't shipped yet I think.",
               "My plans changed."]),
}
DAMAGE = ["cracked", "bent", "badly scratched", "dented", "snapped", "broken", "torn", "scuffed", "smashed"]
PIECES = ["frame", "rear wheel", "derailleur hanger", "brake lever", "handlebar", "buckle", "zipper", "lens",
          "clip", "valve"]
SPECS = ["a 12-speed Shimano drivetrain", "my 2019 Trek Fuel EX", "a 1x setup", "Boost 148 hubs",
         "an 11-speed SRAM shifter", "my gravel bike", "27.5 inch wheels", "a carbon frame", "my e-bike",
         "a 30mm internal rim"]
GREETINGS = ["", "", "Hi,", "Hello,", "Hi there,", "Hey,", "Hi Northwind,", "Hello Northwind Cycles team,",
             "Good morning,", "Hi support,", "Hi!", "Hello!"]
CLOSINGS = ["", "", "Thanks!", "Thanks.", "Thank you.", "Cheers.", "Thanks in advance.", "Appreciate it.", "Thx"]


def _dress(sentences: list[str], rng: random.Random) -> str:
    """A customer's message around its sentences: a greeting, a sign-off and a name, sometimes email style."""
    greeting, closing = rng.choice(GREETINGS), rng.choice(CLOSINGS)
    signature = rng.choice(NAMES) if rng.random() < 0.3 else ""
    if rng.random() < 0.3 and greeting:  # email style, on separate lines
        sign_off = "\n".join(filter(None, [closing, signature]))
        return "\n\n".join(filter(None, [greeting, " ".join(sentences), sign_off]))
    return _greet(greeting, " ".join(filter(None, [*sentences, closing, signature and f"- {signature}"])))


def _reply(intent: str, oid: str | None) -> str:
    """The router's exact reply: compact JSON, the keys in this order."""
    return json.dumps({"intent": intent, "order_id": oid}, separators=(", ", ": "))


def _chat_row(rng: random.Random, i: int) -> dict:
    intent = INTENTS[i % len(INTENTS)]
    spec = CHAT[intent]
    slots = _slots(rng)
    slots.update(damage=rng.choice(DAMAGE), piece=rng.choice(PIECES), spec=rng.choice(SPECS),
                 number=str(rng.randrange(2, 4000)))
    core = rng.choice(spec["core"])
    has_id = rng.random() < spec["id_rate"] or (intent == "product_question" and "{order}" in core)
    inline = has_id and "{order}" in core and rng.random() < 0.7
    slots["order"] = rng.choice(ORDER_WITH_ID) if inline else rng.choice(ORDER_WITHOUT_ID).format(**slots)
    sentences = [_cap(core.format(**slots))]
    if rng.random() < 0.5:  # context goes after the request; a question's background may come first
        first = intent == "product_question" and rng.random() < 0.4
        sentences.insert(0 if first else 1, _cap(rng.choice(spec["extra"]).format(**slots)))
    if has_id and not inline:
        sentences.insert(rng.choice([0, len(sentences)]), rng.choice(ID_SENTENCES))
    text = _dress(sentences, rng)
    oid = order_id(rng) if has_id else None
    text = _casual(text, rng).replace(ID, oid or "")
    return {"messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text},
                         {"role": "assistant", "content": _reply(intent, oid)}]}


# ---------------------------------------------------------------------------------------------------------
# 2. product-titles: clean a supplier's product line into the house title style (completion SFT)
# ---------------------------------------------------------------------------------------------------------

# House style: "{Brand} {Series} {CODE} {N-Speed | size} {Part}[, Size S] ({Color})": brand and series as
# the maker writes them, model code upper case, speed as "12-Speed", color last in parentheses, SKU and
# supplier noise dropped. Catalogue rows: (brand, series, code, spec kind, parts, spec values, colors).
DRIVETRAIN = ["Rear Derailleur", "Cassette", "Shifter", "Crankset"]
TIRE_COLORS = ["Black", "Black/Tan"]
TITLE_CATALOGUE = [
    ("Shimano", "Deore", "M6100", "speed", DRIVETRAIN, [12], ["Black", "Silver"]),
    ("Shimano", "SLX", "M7100", "speed", DRIVETRAIN, [12], ["Black", "Gray"]),
    ("Shimano", "XT", "M8100", "speed", DRIVETRAIN, [12], ["Black", "Silver"]),
    ("Shimano", "Ultegra", "R8000", "speed", ["Rear Derailleur", "Cassette", "Crankset"], [11], ["Gray", "Black"]),
    ("Shimano", "105", "R7000", "speed", ["Rear Derailleur", "Cassette", "Crankset"], [11], ["Black", "Silver"]),
    ("Shimano", "Tiagra", "4700", "speed", ["Rear Derailleur", "Cassette", "Shifter"], [10], ["Black", "Silver"]),
    ("Shimano", "GRX", "RX810", "speed", ["Rear Derailleur", "Crankset"], [11], ["Gray", "Black"]),
    ("SRAM", "GX Eagle", "", "speed", ["Rear Derailleur", "Cassette", "Chain", "Shifter"], [12],
     ["Black", "Gold", "Silver"]),
    ("SRAM", "NX Eagle", "", "speed", ["Rear Derailleur", "Cassette", "Chain"], [12], ["Black", "Silver"]),
    ("SRAM", "Rival", "AXS", "speed", ["Rear Derailleur", "Crankset"], [12], ["Black", "Gray"]),
    ("Campagnolo", "Chorus", "", "speed", ["Rear Derailleur", "Cassette", "Chain"], [12], ["Black", "Silver"]),
    ("KMC", "", "X12", "speed", ["Chain"], [12], ["Silver", "Gold", "Black"]),
    ("KMC", "", "X11", "speed", ["Chain"], [11], ["Silver", "Black"]),
    ("KMC", "", "X10", "speed", ["Chain"], [10], ["Silver", "Gold"]),
    ("Maxxis", "Minion", "DHF", "tire", ["Tire"], [("29", "2.5"), ("27.5", "2.5"), ("29", "2.3")], TIRE_COLORS),
    ("Maxxis", "Rekon", "", "tire", ["Tire"], [("29", "2.4"), ("29", "2.6"), ("27.5", "2.8")], TIRE_COLORS),
    ("Continental", "Grand Prix", "5000", "tire", ["Tire"], [("700", "25c"), ("700", "28c"), ("700", "32c")],
     TIRE_COLORS),
    ("Schwalbe", "Marathon Plus", "", "tire", ["Tire"], [("700", "35c"), ("700", "38c"), ("26", "2.0")],
     ["Black", "Black/Reflex"]),
    ("WTB", "Byway", "", "tire", ["Tire"], [("650b", "47"), ("700", "40c")], TIRE_COLORS),
    ("Panaracer", "GravelKing", "SK", "tire", ["Tire"], [("700", "38c"), ("700", "43c"), ("650b", "48")],
     ["Black", "Black/Brown"]),
    ("Giro", "Syntax", "MIPS", "size", ["Helmet"], ["S", "M", "L"], ["Matte Black", "White", "Red"]),
    ("Bell", "Falcon XRV", "MIPS", "size", ["Helmet"], ["S", "M", "L", "XL"], ["Matte Black", "Gloss Blue"]),
    ("POC", "Ventral Air", "MIPS", "size", ["Helmet"], ["S", "M", "L"], ["White", "Orange", "Matte Black"]),
    ("Smith", "Network", "MIPS", "size", ["Helmet"], ["S", "M", "L"], ["Matte Black", "Gloss Red", "Gray"]),
    ("Endura", "Hummvee", "", "size", ["Shorts"], ["S", "M", "L", "XL"], ["Black", "Olive Green"]),
    ("Castelli", "Entrata", "", "size", ["Jersey"], ["S", "M", "L", "XL"], ["Red", "Blue", "Black"]),
    ("Pearl Izumi", "Quest", "", "size", ["Bib Shorts", "Jersey"], ["S", "M", "L", "XL"], ["Black", "Navy"]),
    ("Patagonia", "Nano Puff", "", "size", ["Jacket"], ["S", "M", "L"], ["Black", "Navy", "Olive Green"]),
    ("Fox", "Ranger", "", "size", ["Gloves", "Jersey"], ["S", "M", "L", "XL"], ["Black", "Gray", "Orange"]),
    ("Topeak", "JoeBlow Sport", "III", "none", ["Floor Pump"], [None], ["Black", "Red", None]),
    ("Lezyne", "Micro Drive", "800XL", "none", ["Front Light"], [None], ["Black", None]),
    ("Garmin", "Edge", "530", "none", ["Bike Computer"], [None], ["Black", None]),
    ("Osprey", "Talon", "22", "none", ["Backpack"], [None], ["Black", "Blue", "Olive Green"]),
    ("Black Diamond", "Spot", "400", "none", ["Headlamp"], [None], ["Black", "Orange", "Blue"]),
    ("Kryptonite", "Evolution", "", "none", ["U-Lock", "Chain Lock"], [None], ["Black", None]),
    ("Park Tool", "", "PCS-10.3", "none", ["Repair Stand"], [None], ["Blue", None]),
    ("Crankbrothers", "Stamp", "7", "none", ["Flat Pedals"], [None], ["Black", "Red", "Silver"]),
    ("Ortlieb", "Back-Roller", "Classic", "none", ["Panniers"], [None], ["Black", "Red", "Gray"]),
    ("Thule", "EasyFold", "XT 2", "none", ["Bike Rack"], [None], ["Black", "Silver", None]),
]
PART_ALIASES = {
    "Rear Derailleur": ["rear derailleur", "REAR DERAILLEUR", "rear der.", "RD", "r/derailleur", "Rear Derailleur"],
    "Cassette": ["cassette", "CASSETTE", "cass.", "Cassette"], "Shifter": ["shifter", "SHIFTER", "shift lever"],
    "Crankset": ["crankset", "CRANKSET", "crank set", "Crankset"], "Chain": ["chain", "CHAIN", "Chain"],
    "Tire": ["tire", "TIRE", "tyre", "Tyre", "folding tire"], "Helmet": ["helmet", "HELMET", "Helmet"],
    "Shorts": ["shorts", "SHORTS", "short"], "Jersey": ["jersey", "JERSEY", "Jersey"],
    "Bib Shorts": ["bib shorts", "BIB SHORTS", "bibshort"], "Jacket": ["jacket", "JACKET", "jkt"],
    "Gloves": ["gloves", "GLOVES", "glove"], "Floor Pump": ["floor pump", "FLOOR PUMP", "track pump"],
    "Front Light": ["front light", "FRONT LIGHT", "headlight"],
    "Bike Computer": ["bike computer", "GPS computer", "BIKE COMPUTER"],
    "Backpack": ["backpack", "BACKPACK", "pack"], "Headlamp": ["headlamp", "HEADLAMP", "head torch"],
    "U-Lock": ["u-lock", "U LOCK", "ulock"], "Chain Lock": ["chain lock", "CHAIN LOCK"],
    "Repair Stand": ["repair stand", "REPAIR STAND", "workstand"],
    "Flat Pedals": ["flat pedals", "FLAT PEDALS", "flats"],
    "Panniers": ["panniers", "PANNIERS", "pannier pair"], "Bike Rack": ["bike rack", "hitch rack", "BIKE RACK"],
}
COLOR_ALIASES = {"Black": ["black", "BLK", "blk", "BLACK"], "Silver": ["silver", "SLV", "SILVER"],
                 "Gray": ["gray", "grey", "GRY", "GREY"], "Gold": ["gold", "GLD", "GOLD"],
                 "White": ["white", "WHT", "WHITE"],
                 "Red": ["red", "RED", "rd"], "Blue": ["blue", "BLU", "BLUE"], "Orange": ["orange", "ORG", "ORANGE"],
                 "Navy": ["navy", "NAVY", "NVY"], "Tan": ["tan", "TAN"], "Reflex": ["reflex", "REFLEX"],
                 "Brown": ["brown", "BRN"], "Green": ["green", "GRN"], "Olive": ["olive", "OLV"]}
FINISH_ALIASES = {"Matte": ["matte", "MATTE", "mt"], "Gloss": ["gloss", "GLOSS", "gls"]}
SIZE_ALIASES = {"S": ["S", "s", "sm", "small"], "M": ["M", "m", "med", "medium"], "L": ["L", "l", "lg", "large"],
                "XL": ["XL", "xl", "x-large"]}
NOISE = ["NEW", "NEW!", "*CLOSEOUT*", "(clearance)", "**", "OEM boxed", "in stock"]


def _messy_case(word: str, rng: random.Random) -> str:
    return rng.choice([word, word, word.lower(), word.upper()])


def _messy_color(color: str, rng: random.Random) -> str:
    """"Matte Black" -> "mt BLK", "Black/Tan" -> "black / TAN": each word from its alias list."""
    out = []
    for part in color.split("/"):
        words = [rng.choice(FINISH_ALIASES.get(w) or COLOR_ALIASES.get(w) or [w.lower()]) for w in part.split()]
        out.append(" ".join(words))
    return rng.choice(["/", " / ", "-"]).join(out)


def _messy_spec(kind: str, value, rng: random.Random) -> tuple[str, str]:
    """(messy, clean) for a speed, tire size or garment size."""
    if kind == "speed":
        form = rng.choice(["{}spd", "{} spd", "{}-speed", "{} speed", "{}s", "{}SPD", "{}-SPD", "{}sp", "{} SPEED"])
        return form.format(value), f"{value}-Speed"
    if kind == "tire":
        wheel, width = value
        messy_width = width[:-1] + rng.choice(["c", "C", ""]) if width.endswith("c") else width
        messy_wheel = wheel.upper() if wheel.endswith("b") and rng.random() < 0.4 else wheel
        sep = rng.choice(["x", " x ", "X", " X ", "*"])
        inches = rng.choice(["", "", '"']) if not width.endswith("c") else ""
        return f"{messy_wheel}{sep}{messy_width}{inches}", f"{wheel} x {width}"
    if kind == "size":
        return rng.choice(["sz ", "size ", "SIZE: ", "Sz.", ""]) + rng.choice(SIZE_ALIASES[value]), value
    return "", ""


def _title_row(rng: random.Random, i: int) -> dict:
    brand, series, code, kind, parts, specs, colors = rng.choice(TITLE_CATALOGUE)
    part, value, color = rng.choice(parts), rng.choice(specs), rng.choice(colors)
    messy_spec, clean_spec = _messy_spec(kind, value, rng)
    model = " ".join(filter(None, [" ".join(_messy_case(w, rng) for w in series.split()),
                                   rng.choice([code, code.lower()])]))
    fields = {"B": _messy_case(brand, rng), "M": model, "P": rng.choice(PART_ALIASES[part]), "X": messy_spec,
              "C": _messy_color(color, rng) if color else ""}
    order = rng.choice(["BMXPC", "BMXPC", "BMPXC", "PBMXC", "BPMXC", "BMPCX"])
    sep = rng.choice([" ", " ", ", ", " - ", " / ", " | ", "  "])
    pieces = [fields[k] for k in order if fields[k]]
    if color and rng.random() < 0.2:  # "(black)" right after the part instead of its own field
        pieces[pieces.index(fields["C"])] = f"({fields['C']})"
    sku = str(rng.randrange(10000, 999999))
    line = sep.join(pieces)
    if rng.random() < 0.25:
        line = rng.choice([f"{sku} {line}", f"[{sku}] {line}", f"SKU {sku} - {line}"])
    else:
        line += rng.choice([f" -- SKU {sku}", f" sku:{sku}", f" SKU#{sku}", f"  [{sku}]", f" #{sku}",
                            f", item {sku}", f" | {sku}", f" (SKU {sku})"])
    if rng.random() < 0.15:
        noise = rng.choice(NOISE)
        line = f"{noise} {line}" if rng.random() < 0.5 else f"{line} {noise}"
    title = " ".join(filter(None, [brand, series, code, clean_spec if kind != "size" else "", part]))
    if kind == "size":
        title += f", Size {clean_spec}"
    if color:
        title += f" ({color})"
    return {"prompt": line + "\nClean title:", "completion": " " + title}


# ---------------------------------------------------------------------------------------------------------
# 3. ticket-topics: short messages, five topics (classification)
# ---------------------------------------------------------------------------------------------------------

TOPICS = {
    "shipping": [
        "When will my {product_bare} ship?", "Do you ship to {city}?", "How much is express shipping to {city}?",
        "My tracking number doesn't work.", "Package says delivered but it's not on my porch.",
        "Can I get my order {when_future}?", "Is shipping free on orders over ${amount}?",
        "Which carrier do you use for bikes?", "How long does delivery to {city} usually take?",
        "Tracking hasn't updated in {days} days.", "Do you ship to Canada?",
        "Can I pick up in store instead of having it shipped?", "The courier left my box at the wrong house.",
        "Why does shipping a bike cost so much?", "Do you deliver on weekends?",
        "{carrier} says my parcel is held at the depot.", "Does the {bike_bare} ship fully assembled?",
        "Can you ship {product} with {carrier} instead?"],
    "billing": [
        "I was charged twice for order {oid}.", "My card got declined at checkout but my bank says it's fine.",
        "Can I pay with {payment}?", "I need an invoice for order {oid} for my company.",
        "Promo code {code} isn't working.", "There's a charge of ${amount} I don't recognize.",
        "Why was I charged sales tax?", "Can I split the payment into installments?",
        "My gift card balance looks wrong.",
        "The price of the {product_bare} dropped the day after I bought it, can you adjust it?",
        "Do you charge my card when I order or when it ships?", "Can I change the card used on order {oid}?",
        "The total at checkout was higher than my cart.", "I got billed ${amount} but the order was ${amount2}.",
        "Is there a student discount?", "Can you resend the receipt for order {oid}?"],
    "product": [
        "Does {part} fit {spec}?", "Is {gear} waterproof?", "What size {bike_bare} do I need? I'm {height}.",
        "Does {wear} come in {color}?", "How heavy is {gear}?", "Is {bike} good for commuting?",
        "What's the weight limit on {bike}?", "Will {product} be back in stock?",
        "Which is better for touring, the {bike_bare} or the {bike2_bare}?",
        "Does {gear} include the mounting bracket?", "What's the warranty on {product}?",
        "Is {part} compatible with {spec}?", "Does {wear} run small?", "Can {bike} take 2.4 inch tires?",
        "How bright is {gear} on the lowest setting?"],
    "returns": [
        "How do I return {product}?", "Can I exchange {wear} for a size {size}?",
        "The return label never came through.", "What's your return window?",
        "I sent back {product} {when_past}, did you get it?", "Can I return a bike I've ridden once?",
        "Do I have to pay for return shipping?", "Can I return {product} to your {city} store?",
        "I want to send back part of order {oid}.", "My return was rejected, why?",
        "Can I swap {wear} for a different color?", "Is there a restocking fee on returns?",
        "Where's the refund for the {product_bare} I returned?", "Can I return {gear} without the original box?",
        "I need a return label for order {oid}."],
    "account": [
        "I can't log in to my account.", "The password reset link expired.",
        "How do I change the email on my account?", "Please delete my account and my data.",
        "How do I unsubscribe from the newsletter?", "My rewards points disappeared.",
        "I'm not getting the two-factor code.", "Can I merge my two accounts?",
        "My order history is empty even though I've ordered before.", "How do I update my saved address?",
        "Someone else logged into my account.", "I signed up with my work email and can't verify it.",
        "Can you change the name on my account to {name}?", "The app keeps logging me out.",
        "My account says locked after too many attempts.", "How do I turn off saved cards on my profile?"],
}
LABELS = tuple(TOPICS)
PAYMENTS = ["PayPal", "Apple Pay", "Klarna", "Afterpay", "a gift card", "bank transfer", "two cards"]
PREFIXES = ["", "", "", "Hi,", "Hello -", "Quick question:", "Hey,", "Hi there.", "Urgent:", "Hi!"]
SUFFIXES = ["", "", "", " Thanks!", " Thanks.", " Please help.", " Cheers", " Thx", " Any ideas?"]


def _ticket_row(rng: random.Random, i: int) -> dict:
    label = LABELS[i % len(LABELS)]
    slots = _slots(rng)
    slots.update(oid=order_id(rng), payment=rng.choice(PAYMENTS), spec=rng.choice(SPECS),
                 code=rng.choice(["SPRING20", "RIDE15", "WELCOME10", "TRAIL25", "NWFREESHIP"]),
                 amount2=f"{rng.randrange(9, 400)}.00")
    text = _greet(rng.choice(PREFIXES), _cap(rng.choice(TOPICS[label]).format(**slots))) + rng.choice(SUFFIXES)
    return {"text": _casual(text, rng), "label": label}


# ---------------------------------------------------------------------------------------------------------
# 4. gear-ner: customer sentences tagged PRODUCT, BRAND, CITY, DATE, ORDER (IOB2, CoNLL)
# ---------------------------------------------------------------------------------------------------------

# Whitespace and punctuation split; "NW-12345" and words with an apostrophe ("isn't") stay whole.
TOKEN = re.compile(r"NW-\d+|\w+(?:'\w+)*|[^\w\s]")
NER_TEMPLATES = [
    "My {PRODUCT} from order {ORDER} still hasn't arrived in {CITY}.",
    "I ordered the {PRODUCT} {ON_PAST} and it still isn't here.",
    "Do you have anything from {BRAND} in stock at the {CITY} store?",
    "Can I pick up order {ORDER} at your {CITY} shop {ON_FUTURE}?",
    "The {PRODUCT} I bought {ON_PAST} is already making a clicking noise.",
    "Is the {PRODUCT} compatible with my {PRODUCT}?",
    "I'm riding from {CITY} to {CITY} {ON_FUTURE}, will the {PRODUCT} arrive before then?",
    "Please send the replacement {PRODUCT} to my address in {CITY}.",
    "Do you carry {BRAND} or only {BRAND}?",
    "Order {ORDER} was supposed to arrive {ON_PAST}.",
    "Hi, this is {NAME} from {CITY}, I have a question about #{ORDER}.",
    "I returned the {PRODUCT} {ON_PAST} but haven't had a refund for {ORDER} yet.",
    "The {PRODUCT} in order {ORDER} came with a deep scratch.",
    "Can you ship the {PRODUCT} to {CITY} by {DATE_FUTURE}?",
    "Does {BRAND} still offer crash replacement on the {PRODUCT}?",
    "I need the {PRODUCT} and the {PRODUCT} before my trip to {CITY} {ON_FUTURE}.",
    "Your {CITY} store told me to email about order {ORDER}.",
    "Tracking for {ORDER} shows it stuck in {CITY} since {DATE_PAST}.",
    "Does the {PRODUCT} come in a smaller size?",
    "My {PRODUCT} arrived {ON_PAST} without the mounting hardware.",
    "I'd like to swap the {PRODUCT} in {ORDER} for the {PRODUCT}.",
    "We're moving to {CITY} {ON_FUTURE}, please hold order {ORDER} until then.",
    "Which {BRAND} model would you recommend for long rides?",
    "Got the {PRODUCT} {ON_PAST}, love it, but the {PRODUCT} in the same box was the wrong size.",
    "Can I collect {ORDER} from the {CITY} warehouse?",
    "Is the {BRAND} warranty handled by you or by {BRAND} directly?",
    "Do you price match {BRAND} products sold in {CITY}?",
    "{NAME} here, my order {ORDER} shipped {ON_PAST} but tracking shows nothing.",
    "Will the {PRODUCT} be restocked before {DATE_FUTURE}?",
    "Please cancel {ORDER}, I bought the {PRODUCT} at a shop in {CITY} instead.",
    "The {BRAND} rep in {CITY} said you would have the {PRODUCT} by {DATE_FUTURE}.",
    "How long does shipping to {CITY} usually take?",
    "Order {ORDER} and order {ORDER} should have shipped together.",
    "Does the {PRODUCT} work with {BRAND} parts?",
    "My wife ordered the {PRODUCT} for me {ON_PAST}, order number {ORDER}.",
    "Are there any {BRAND} demo days in {CITY} {ON_FUTURE}?",
    "Thanks for sorting out {ORDER} so quickly, the {PRODUCT} is perfect.",
    "Can I still return the {PRODUCT} I bought {ON_PAST}?",
    "What is the difference between the {PRODUCT} and the {PRODUCT}?",
    "I need a spare tube for my ride to {CITY} {ON_FUTURE}.",
    "The courier left {ORDER} at the wrong house in {CITY}.",
    "Is the {PRODUCT} in stock at your {CITY} store?",
    "Hello, the {PRODUCT} I ordered {ON_PAST} ({ORDER}) has a bent rotor.",
    "I have been a {BRAND} fan for years but the {PRODUCT} let me down.",
    "Could the {PRODUCT} be delivered to {CITY} instead of {CITY}?",
    "Since {DATE_PAST} I have emailed three times about {ORDER}.",
    "I will be in {CITY} from {DATE_FUTURE} to {DATE_FUTURE}, can the {PRODUCT} wait at the shop?",
    "Do you stock spare parts for {BRAND}?",
    "The {PRODUCT} and {PRODUCT} from {ORDER} both arrived {ON_PAST}, thanks!",
]
SLOT = re.compile(r"\{(\w+)\}")


def _date(rng: random.Random, when: str, on: bool) -> tuple[str, str]:
    """(preposition, date) for a past or future date; the preposition is "on" only where English wants it."""
    month, day = rng.choice(MONTHS), rng.randrange(1, 29)
    absolute = rng.choice([f"{month} {day}", f"{month} {_ordinal(day)}", f"{month[:3]} {day}"])
    weekday = rng.choice(WEEKDAYS)
    relative = rng.choice(["yesterday", "last week", f"last {weekday}"] if when == "past"
                          else ["tomorrow", "next week", f"next {weekday}", "this weekend"])
    kind = rng.choice(["absolute", "weekday", "relative"])
    if kind == "relative":
        return "", relative
    return ("on" if on else ""), (absolute if kind == "absolute" else weekday)


def _entity(slot: str, rng: random.Random) -> list[tuple[str, str | None]]:
    """(text, entity type or None) pieces for one template slot."""
    if slot in ("ON_PAST", "ON_FUTURE", "DATE_PAST", "DATE_FUTURE"):
        prep, date = _date(rng, slot.split("_")[1].lower(), on=slot.startswith("ON"))
        return [(prep, None), (date, "DATE")] if prep else [(date, "DATE")]
    value = {"PRODUCT": lambda: product_name(rng), "BRAND": lambda: rng.choice(BRANDS),
             "CITY": lambda: rng.choice(CITIES), "ORDER": lambda: order_id(rng),
             "NAME": lambda: rng.choice(NAMES)}[slot]()
    return [(value, None if slot == "NAME" else slot)]


def _ner_row(rng: random.Random, i: int) -> dict:
    template = rng.choice(NER_TEMPLATES)
    tokens, tags, text, used = [], [], "", set()
    for j, piece in enumerate(SLOT.split(template)):
        parts = [(piece, None)]
        if j % 2:  # a slot; the same value twice in one sentence ("from Bend to Bend") reads wrong
            while (parts := _entity(piece, rng))[-1][0] in used:
                pass
            used.add(parts[-1][0])
        for words, kind in parts:
            # a space between a slot and its neighbours, unless one is already there or it is "#", "(", "."
            glued = not text or text.endswith((" ", "#", "(")) or not words[:1].isalnum()
            text += ("" if glued else " ") + words
            new = TOKEN.findall(words)
            tokens += new
            tags += [f"{'B' if k == 0 else 'I'}-{kind}" if kind else "O" for k in range(len(new))]
    assert TOKEN.findall(text) == tokens, (text, tokens)  # slots split where the whole sentence would
    return {"tokens": tokens, "tags": tags}


# ---------------------------------------------------------------------------------------------------------
# 5. support-tools: the same customers, answered by calling the shop's order tools (chat SFT with tools, in
#    OpenAI's fine-tuning format: `tools` per record, assistant `tool_calls`, `tool` results)
# ---------------------------------------------------------------------------------------------------------

REASONS = ("returned", "damaged", "wrong_item")


def _tool(name: str, description: str, **properties) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": list(properties)}}}


# Terse on purpose: every prompt carries all of them (about 300 tokens with the convention's preamble), and a
# conversation must fit the default max_length of 512 tokens with them, or its last turn is cut off in training.
SHOP_TOOLS = [
    _tool("lookup_order", "Order status and tracking.", order_id={"type": "string"}),
    _tool("create_refund", "Refund an order.", order_id={"type": "string"},
          reason={"type": "string", "enum": list(REASONS)}),
    _tool("change_address", "Change an order's shipping address.", order_id={"type": "string"},
          address={"type": "string"}),
]
# What a customer asks for: the function, or for a refund its reason. Every request names the order ({order}).
ADDRESS = "\x01"  # like ID: the address is put back verbatim after the message is roughed up
TOOL_REQUESTS = {
    "lookup_order": CHAT["order_status"]["core"],
    "returned": [
        "I returned {product} {when_past} and still haven't seen the refund for {order}.",
        "You received my return for {order} {days} days ago but there's no refund yet.",
        "I sent {product} back {when_past}, please refund {order}.", "Still waiting on my refund for {order}.",
        "My return for {order} was delivered to you {when_past}. Where's my money?",
        "The return tracking for {order} says you got it, can you refund me?",
        "I mailed {product} from {order} back to you, I'd like the refund please."],
    "damaged": CHAT["damaged_item"]["core"],
    "wrong_item": [
        "{order} had the wrong item in it: I got {gear} instead of {product}.",
        "Wrong item in {order}, I ordered {wear} in {size} and got something else.",
        "The box for {order} had {part} in it, which is not what I ordered.",
        "{order} came with someone else's order inside.", "I got the wrong color: {order} was supposed to be {color}.",
        "Please refund {order}, you shipped the wrong size.", "You sent me {gear} in {order}, I never ordered that."],
    "change_address": [
        "Please ship {order} to {address} instead.", "Wrong address on {order}, it should go to {address}.",
        "Can I redirect {order} to my work address? It's {address}.",
        "Could you change the address for {order} to {address}?", "Change of address for {order}: {address}.",
        "I just moved, please send {order} to {address}.", "New address for {order} is {address}, can you update it?",
        "I typed my old address on {order}, the right one is {address}."],
}
TOOL_EXTRAS = {
    "lookup_order": CHAT["order_status"]["extra"],
    "returned": ["It didn't fit.", "It was the wrong size for me.", "I dropped it off at the {carrier} store {when_past}."],
    "damaged": ["I've attached a couple of photos.", "The packaging looked fine from the outside.",
                "I haven't even used it.", "Really disappointed, it was a gift."],
    "wrong_item": ["Photos attached.", "I double checked my confirmation email.", "I need the right one {when_future}."],
    "change_address": ["Sorry for the hassle!", "I won't be at the old place anymore."],
}
# lookups and address changes each twice as likely as one kind of refund: 2/7, 3/7 (refunds) and 2/7 per function
ACTIONS = ("lookup_order", "lookup_order", *REASONS, "change_address", "change_address")
PRODUCT_QUESTIONS = [c for c in CHAT["product_question"]["core"] if "{order}" not in c]
PARALLEL = ["Where are {order} and {order2}?", "Can you check the status of {order} and {order2}?",
            "Any news on my two orders, {order} and {order2}?", "Has either {order} or {order2} shipped yet?",
            "I have two orders on the way, {order} and {order2}. When will they arrive?"]
ID2 = "\x02"
GIVE_ID = ["It's " + ID + ".", ID, "Order number is " + ID + ".", "Sorry, it's " + ID, "#" + ID, ID + " thanks",
           "oh right, " + ID]
THANKS = ["Thanks!", "Great, thank you.", "perfect thx", "Awesome, thanks for the help.", "Thank you so much!",
          "ok thanks"]
# The assistant's fixed words where no call is due, so a reply in words is as learnable as a call.
ASK_ID = "I can help with that. What is the order number? It is in your confirmation email and starts with NW."
PRODUCT_REPLY = ("I can only help with orders here. For product questions, our shop team answers at "
                 "gear@northwindcycles.com.")
WELCOME = "You're welcome! Enjoy the ride."
# What each conversation ends with (its last assistant turn is what evaluation scores), cycled for balance:
# a call (the id in the message; given when asked; two orders at once), words after a tool result, plain words.
TOOL_KINDS = ["call"] * 8 + ["ask_then_call"] * 2 + ["parallel"] + ["answer"] * 4 + ["ask"] * 2 + ["product"] * 2 + \
    ["thanks"]


def _call_turn(*calls: tuple[str, dict]) -> dict:
    return {"role": "assistant", "tool_calls": [
        {"id": f"call_{k}", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
        for k, (name, args) in enumerate(calls, 1)]}


def _arguments(action: str, oid: str, address: str) -> tuple[str, dict]:
    if action == "lookup_order":
        return action, {"order_id": oid}
    if action == "change_address":
        return action, {"order_id": oid, "address": address}
    return "create_refund", {"order_id": oid, "reason": action}


def _outcome(name: str, args: dict, rng: random.Random) -> tuple[dict, str]:
    """What the shop's system answers to a call, and what the assistant tells the customer from it."""
    oid, date, carrier = args["order_id"], f"{rng.choice(MONTHS)} {rng.randrange(1, 29)}", rng.choice(CARRIERS)
    if name == "lookup_order":
        status = rng.choice(["processing", "shipped", "delivered"])
        if status == "processing":
            return {"status": status, "ships_by": date}, f"Order {oid} is being packed and should ship by {date}."
        if status == "shipped":
            return ({"status": status, "carrier": carrier, "eta": date},
                    f"Order {oid} shipped with {carrier} and should arrive on {date}.")
        return {"status": status, "carrier": carrier, "on": date}, f"{carrier} delivered order {oid} on {date}."
    if name == "create_refund":
        amount = f"{rng.randrange(9, 400)}.{rng.choice(['00', '99'])}"
        return {"refunded": amount}, f"Done: ${amount} for order {oid} is back on your card in 3-5 business days."
    if rng.random() < 0.75:
        return {"updated": True}, f"Done: order {oid} will now ship to the new address."
    return {"updated": False, "status": "shipped"}, f"Order {oid} has already shipped, so its address can't change."


def _tools_message(core: str, extras: list[str], slots: dict, rng: random.Random, id_sentence: bool) -> str:
    """A customer's message: the core request, maybe some context, and (id_sentence) the id on its own."""
    sentences = [_cap(core.format(**slots))]
    if extras and rng.random() < 0.4:
        sentences.append(_cap(rng.choice(extras).format(**slots)))
    if id_sentence:
        sentences.insert(rng.choice([0, len(sentences)]), rng.choice(ID_SENTENCES))
    return _casual(_dress(sentences, rng), rng)


# A conversation's messages as JSON at most this long come to at most ~505 tokens with the definitions (SmolLM2's
# tokenizer, which spells digits one by one): under the default max_length of 512, so no last turn is cut off.
MAX_CONVERSATION_CHARS = 620


def _tools_row(rng: random.Random, i: int) -> dict:
    """A conversation of kind TOOL_KINDS[i % len(TOOL_KINDS)], drawn again while it is too long to train whole."""
    while len(json.dumps((row := _conversation(rng, i))["messages"])) > MAX_CONVERSATION_CHARS:
        pass
    return row


def _conversation(rng: random.Random, i: int) -> dict:
    kind = TOOL_KINDS[i % len(TOOL_KINDS)]
    slots = _slots(rng)
    oid, oid2, address = order_id(rng), order_id(rng), slots["address"]
    slots.update(damage=rng.choice(DAMAGE), piece=rng.choice(PIECES), spec=rng.choice(SPECS), address=ADDRESS)
    messages = []  # no system prompt: the definitions make one (the convention's), and every token counts
    if kind == "product":
        text = _tools_message(rng.choice(PRODUCT_QUESTIONS), CHAT["product_question"]["extra"], slots, rng, False)
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": PRODUCT_REPLY}]
        return {"messages": messages, "tools": SHOP_TOOLS}
    if kind == "parallel":
        slots.update(order=rng.choice(["", "#", "order "]) + ID, order2=ID2)
        text = _tools_message(rng.choice(PARALLEL), [], slots, rng, False).replace(ID, oid).replace(ID2, oid2)
        messages += [{"role": "user", "content": text},
                     _call_turn(("lookup_order", {"order_id": oid}), ("lookup_order", {"order_id": oid2}))]
        return {"messages": messages, "tools": SHOP_TOOLS}
    action = rng.choice(ACTIONS)
    with_id, core = kind not in ("ask", "ask_then_call"), rng.choice(TOOL_REQUESTS[action])
    inline = with_id and "{order}" in core and rng.random() < 0.7  # else the id comes in a sentence of its own
    slots["order"] = rng.choice(ORDER_WITH_ID) if inline else rng.choice(ORDER_WITHOUT_ID).format(**slots)
    text = _tools_message(core, TOOL_EXTRAS[action], slots, rng, with_id and not inline)
    messages.append({"role": "user", "content": text.replace(ID, oid).replace(ADDRESS, address)})
    if not with_id:
        messages.append({"role": "assistant", "content": ASK_ID})
        if kind == "ask":
            return {"messages": messages, "tools": SHOP_TOOLS}
        messages.append({"role": "user", "content": rng.choice(GIVE_ID).replace(ID, oid)})
    name, args = _arguments(action, oid, address)
    messages.append(_call_turn((name, args)))
    if kind in ("answer", "thanks"):
        result, words = _outcome(name, args, rng)
        messages += [{"role": "tool", "tool_call_id": "call_1", "content": json.dumps(result)},
                     {"role": "assistant", "content": words}]
    if kind == "thanks":
        messages += [{"role": "user", "content": rng.choice(THANKS)}, {"role": "assistant", "content": WELCOME}]
    return {"messages": messages, "tools": SHOP_TOOLS}


# ---------------------------------------------------------------------------------------------------------
# 6. support-prefs: the support-chat conversations again, each with its exact JSON reply preferred to a plausible
# wrong one (preference pairs for DPO, ORPO, SimPO) and as thumbs up or down on one reply (KTO)
# ---------------------------------------------------------------------------------------------------------

# The ways a router's reply goes wrong, cycled for balance: the intent of a neighbouring request, the order id
# misread (a digit changed, dropped, or made up), a friendly sentence instead of the JSON, the JSON in chatter.
REJECTIONS = ("intent", "order_id", "prose", "wrapped")
# Wrong intents a router mixes up with the right one: requests about the same order that differ in what is wanted.
CONFUSABLE = {"refund": ["cancel_order", "damaged_item"], "order_status": ["change_address", "cancel_order"],
              "damaged_item": ["refund", "product_question"], "change_address": ["order_status", "cancel_order"],
              "product_question": ["order_status", "damaged_item"], "cancel_order": ["refund", "order_status"]}
INTENT_WORDS = {"refund": "a refund", "order_status": "where your order is", "damaged_item": "an item that arrived "
                "damaged", "change_address": "changing the delivery address", "product_question": "a question about "
                "one of our products", "cancel_order": "cancelling an order"}
PROSE = ["Thanks for reaching out! It looks like you need help with {what}{about}. I've passed your message on to "
         "our support team, and someone will get back to you within one business day.",
         "I'm sorry for the trouble. I've noted that your message is about {what}{about}, and our support team "
         "will look into it and reply by email shortly.",
         "Hello! I've read your message: it is about {what}{about}. Is there anything else I can help you with?"]
WRAPPED = ["Sure! Here is the routing for this message:\n\n{json}", "```json\n{json}\n```",
           "{json}\n\nLet me know if there's anything else I can help with.",
           "Based on the message, the routing is: {json}"]


def _misread(oid: str, rng: random.Random) -> str:
    """The id with one digit changed (still five digits: the first stays non-zero)."""
    i = rng.randrange(len("NW-"), len(oid))
    digit = rng.choice([d for d in "0123456789" if d != oid[i] and (d != "0" or i > len("NW-"))])
    return oid[:i] + digit + oid[i + 1:]


def _rejected(kind: str, intent: str, oid: str | None, rng: random.Random) -> str:
    """A plausible wrong reply of `kind` (one of REJECTIONS) where the right one is _reply(intent, oid)."""
    if kind == "intent":
        return _reply(rng.choice(CONFUSABLE[intent]), oid)
    if kind == "order_id":
        if oid is None:
            return _reply(intent, order_id(rng))
        return _reply(intent, None if rng.random() < 0.5 else _misread(oid, rng))
    if kind == "prose":
        return rng.choice(PROSE).format(what=INTENT_WORDS[intent], about=f" (order {oid})" if oid else "")
    return rng.choice(WRAPPED).format(json=_reply(intent, oid))


def _pair(row: dict, i: int, rng: random.Random) -> dict:
    """A support-chat conversation as TRL's conversational pair: the exact reply chosen, a wrong one rejected."""
    *prompt, answer = row["messages"]
    parsed = json.loads(answer["content"])
    wrong = _rejected(REJECTIONS[i % len(REJECTIONS)], parsed["intent"], parsed["order_id"], rng)
    return {"prompt": prompt, "chosen": [answer], "rejected": [{"role": "assistant", "content": wrong}]}


def _thumbs(pairs: list[dict]) -> list[dict]:
    """Thumbs on one reply per conversation, as the web page records them (KTO's prompt/completion/label): the
    chosen reply up for four conversations, then the rejected one down for the next four, so the thumbs are half up
    and every kind of wrong reply gets its share of the downs."""
    up = [(i // len(REJECTIONS)) % 2 == 0 for i in range(len(pairs))]
    return [{"prompt": p["prompt"], "completion": p["chosen" if good else "rejected"], "label": good}
            for p, good in zip(pairs, up)]


def _preference_files(train: list[dict], test: list[dict], rng: random.Random) -> dict[str, str]:
    """support-prefs from support-chat's splits: a test prompt is one of support-chat's held-out messages."""
    train_pairs = [_pair(row, i, rng) for i, row in enumerate(train)]
    test_pairs = [_pair(row, i, rng) for i, row in enumerate(test)]
    return {"support-prefs/train.jsonl": _jsonl(train_pairs), "support-prefs/test.jsonl": _jsonl(test_pairs),
            "support-prefs/thumbs.jsonl": _jsonl(_thumbs(train_pairs))}


# ---------------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------------

def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["text", "label"])
    writer.writerows([row["text"], row["label"]] for row in rows)
    return buffer.getvalue()


def _conll(rows: list[dict]) -> str:
    return "\n".join("".join(f"{t} {g}\n" for t, g in zip(row["tokens"], row["tags"])) for row in rows)


def _text_of(row: dict) -> str:
    """The input text of a row: what must not repeat between train and test."""
    if "messages" in row:
        return next(m["content"] for m in row["messages"] if m["role"] == "user")
    return row.get("prompt") or row.get("text") or " ".join(row["tokens"])


# name: (make a row, train size, test size, file suffix, serialiser)
DATASETS = {
    "support-chat": (_chat_row, 400, 80, "jsonl", _jsonl),
    "product-titles": (_title_row, 400, 80, "jsonl", _jsonl),
    "ticket-topics": (_ticket_row, 500, 100, "csv", _csv),
    "gear-ner": (_ner_row, 400, 80, "conll", _conll),
    "support-tools": (_tools_row, 300, 80, "jsonl", _jsonl),
}


def build(seed: int = SEED) -> dict[str, str]:
    """{"support-chat/train.jsonl": file text, ...} for every dataset; the same for the same seed."""
    files, splits = {}, {}
    for name, (make, n_train, n_test, suffix, serialise) in DATASETS.items():
        rng = random.Random(f"{name}:{seed}")  # one stream per dataset: editing one leaves the others alone
        train, test = splits[name] = _split(_unique(make, n_train + n_test, _text_of, rng), n_test, rng)
        files[f"{name}/train.{suffix}"], files[f"{name}/test.{suffix}"] = serialise(train), serialise(test)
    # made from support-chat's conversations, with a stream of its own for the wrong replies
    files.update(_preference_files(*splits["support-chat"], random.Random(f"support-prefs:{seed}")))
    return files


def write(out, *, force: bool = False) -> list[Path]:
    """Write every dataset under `out`; refuses, writing nothing, if any file exists and not `force`."""
    files = build()
    existing = [str(Path(out) / name) for name in files if (Path(out) / name).exists()]
    if existing and not force:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        raise FileExistsError(f"{existing[0]}{more} already exist; pass --force to overwrite them")
    paths = []
    for name, text in files.items():
        paths.append(Path(out) / name)
        paths[-1].parent.mkdir(parents=True, exist_ok=True)
        paths[-1].write_bytes(text.encode("utf-8"))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="directory to write into (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    args = parser.parse_args(argv)
    try:
        paths = write(args.out, force=args.force)
    except FileExistsError as err:
        print(f"make_data: error: {err}", file=sys.stderr)
        return 1
    for path in paths:
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
