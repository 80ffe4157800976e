// The page's entry point: the three views (#playground, #train/..., #runs/...), chosen by the URL's hash so a
// job, a run or a report can be linked to, and the API-key dialog the first 401 opens.

import { APIError, forgetKey, hasKey, setKeyPrompt } from './api.js';
import { tell } from './dom.js';
import { Playground } from './playground.js';
import { Runs } from './runs.js';
import { Train } from './train.js';

const dialog = document.getElementById('key-dialog');
const keyButton = document.getElementById('key-button');

setKeyPrompt((message) => new Promise((resolve) => {
  const input = document.getElementById('key-input');
  document.getElementById('key-error').textContent = message;
  input.value = '';
  dialog.returnValue = ''; // Escape closes without setting it: a value left from last time must not count
  dialog.addEventListener('close', () => {
    const key = input.value.trim();
    resolve(dialog.returnValue === 'ok' && key ? { key, remember: document.getElementById('key-remember').checked } : null);
  }, { once: true });
  dialog.showModal();
  input.focus();
}));

const playground = new Playground(document.getElementById('playground'));
// "Chat with it" (a run, a fine-tuned model): the playground, the model beside its base.
async function chatWith(model) {
  await playground.loadModels();
  location.hash = '#playground';
  route(); // now, not at the hashchange event: the prompt can take focus only once it is shown
  playground.chatWith(model);
}
const runs = new Runs(document.getElementById('runs'), { onChat: chatWith });
const train = new Train(document.getElementById('train'), { onChat: chatWith });

async function start() {
  try {
    await playground.loadModels();
  } catch (err) {
    const why = err instanceof APIError && err.status === 401 ? 'Without the API key nothing can be shown.' : err.message;
    tell(`Could not reach the server's models: ${why} Reload the page to try again.`, 'error');
    return;
  }
  keyButton.hidden = !hasKey();
  await playground.loadConversations();
}

// #runs/ID and #reports/ID; an ID's slashes may be written as they are or as %2F.
function parse() {
  const [view, ...rest] = location.hash.slice(1).split('/');
  return [view, rest.length ? decodeURIComponent(rest.join('/')) : null];
}

// hash -> the view it shows
const VIEWS = { playground: 'playground', train: 'train', runs: 'runs', reports: 'runs' };

function route() {
  const [hash, id] = parse();
  const view = VIEWS[hash] ?? 'playground';
  for (const name of new Set(Object.values(VIEWS))) {
    document.getElementById(name).hidden = name !== view;
    const tab = document.getElementById(`tab-${name}`);
    if (name === view) tab.setAttribute('aria-current', 'page');
    else tab.removeAttribute('aria-current');
  }
  document.body.dataset.view = view; // the playground keeps its composer in view (style.css)
  if (view === 'runs') runs.show(hash, id);
  if (view === 'train') train.show(id);
  else train.hide(); // a job is followed only while it is shown
}

keyButton.addEventListener('click', () => {
  forgetKey();
  keyButton.hidden = true;
  tell('The API key is forgotten on this browser; the next request asks for it again.');
});

window.addEventListener('hashchange', () => {
  route();
  // A view chosen from the tabs gets the focus at its title; one the page moved to itself keeps its own.
  const [view, id] = parse();
  const active = document.activeElement;
  if (!id && (!active || active === document.body || active.closest('nav, [hidden]'))) {
    document.getElementById(`${VIEWS[view] ?? 'playground'}-title`)?.focus();
  }
});
route();
start();
