// Feedback on replies, kept by the server as training data (POST /v1/feedback, when it was started with
// --feedback DIR): 👍/👎 make a KTO record, Edit a correction (an SFT record, and a pair that prefers it to the
// original), and "Prefer this one" between two panes' replies to the same message a preference pair. Each
// gesture is sent once: its buttons are disabled once the server has kept it.

import { APIError, api } from './api.js';
import { h, tell } from './dom.js';

// Whether the server keeps feedback (GET /v1/feedback answers 404 without --feedback).
export async function feedbackKept() {
  try {
    await api('/v1/feedback?limit=1');
    return true;
  } catch (err) {
    if (!(err instanceof APIError && err.status === 404)) tell(`Could not reach /v1/feedback: ${err.message}`, 'error');
    return false;
  }
}

// POST the gesture; true once kept. `buttons` are disabled while it is sent, and again for good once kept.
async function send(body, buttons) {
  for (const b of buttons) b.disabled = true;
  try {
    const kept = await api('/v1/feedback', { body });
    tell(`Kept as training data: ${kept.data.map((d) => d.file).join(', ')}.`);
    return true;
  } catch (err) {
    for (const b of buttons) b.disabled = false;
    tell(`The feedback was not kept: ${err.message}`, 'error');
    return false;
  }
}

// 👍, 👎 and Edit under a finished reply: `prompt` is the conversation it answered, `reply` its text.
export function judge(message, prompt, reply) {
  const up = h('button', { type: 'button', class: 'quiet good', 'aria-label': 'Good reply', 'aria-pressed': 'false' }, '👍');
  const down = h('button', { type: 'button', class: 'quiet bad', 'aria-label': 'Bad reply', 'aria-pressed': 'false' }, '👎');
  const edit = h('button', { type: 'button', class: 'quiet edit' }, 'Edit');
  const thumb = async (button, label) => {
    if (await send({ gesture: 'thumbs', prompt, reply, label }, [up, down])) button.setAttribute('aria-pressed', 'true');
  };
  up.addEventListener('click', () => thumb(up, true));
  down.addEventListener('click', () => thumb(down, false));
  edit.addEventListener('click', () => correct(message, prompt, reply, edit));
  const bar = h('div', { class: 'feedback', role: 'group', 'aria-label': 'Feedback on this reply' }, up, down, edit);
  message.el.append(bar);
  return bar;
}

// The reply as it should have been: the original stays shown (it is what the conversation goes on from on the
// server), the correction below it.
function correct(message, prompt, reply, button) {
  if (message.el.querySelector('form.correct')) return message.el.querySelector('form.correct textarea').focus();
  const text = h('textarea', { rows: 4, 'aria-label': 'Corrected reply' });
  text.value = reply;
  const cancel = h('button', { type: 'button', class: 'quiet' }, 'Cancel');
  const save = h('button', { type: 'submit', class: 'save-correction' }, 'Keep the correction');
  const form = h('form', { class: 'correct' }, text, h('div', { class: 'row' }, save, cancel));
  cancel.addEventListener('click', () => { form.remove(); button.focus(); });
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    const corrected = text.value;
    if (!(await send({ gesture: 'edit', prompt, reply, corrected }, [save, button]))) return;
    form.replaceWith(h('p', { class: 'correction' }, h('span', { class: 'label' }, 'Corrected: '),
      h('span', { class: 'text' }, corrected)));
  });
  message.el.append(form);
  text.focus();
}

// "Prefer this one" on two panes' replies to the same message ({message, prompt, text} each). The pair's
// prompt is the chosen pane's conversation: the two agree on every user turn and differ only in earlier replies.
export function prefer(first, second) {
  if (first.text === second.text) return; // the same reply twice: nothing to choose between
  const buttons = [];
  for (const [side, other] of [[first, second], [second, first]]) {
    const button = h('button', { type: 'button', class: 'quiet prefer', 'aria-pressed': 'false' }, 'Prefer this one');
    button.addEventListener('click', async () => {
      const body = { gesture: 'choice', prompt: side.prompt, chosen: side.text, rejected: other.text };
      if (!(await send(body, buttons))) return;
      button.setAttribute('aria-pressed', 'true');
      button.textContent = 'Preferred';
    });
    buttons.push(button);
    (side.message.el.querySelector('.feedback') || side.message.el).append(button);
  }
}
