// The Train view (#train, #train/JOB_ID): fine-tune the served model through the server's own files and
// fine-tuning jobs API (/v1/files, /v1/fine_tuning/jobs), as any OpenAI client would. The training data is an
// uploaded file, or what the server keeps made into one when the job starts (POST /v1/files/import): the saved
// conversations, or the --feedback files. The jobs are listed; one opens beside the form (job.js).

import { APIError, api } from './api.js';
import { JOBS, JobView } from './job.js';
import { h, when } from './dom.js';

// hyperparameter (OpenAI's name) -> its input; beta is dpo's only
const SETTINGS = { n_epochs: 'train-epochs', batch_size: 'train-batch', learning_rate_multiplier: 'train-lr',
  beta: 'train-beta' };

export class Train {
  constructor(root, { onChat }) {
    this.root = root;
    this.onChat = onChat;
    this.form = root.querySelector('#train-form');
    this.files = root.querySelector('#train-file');
    this.upload = root.querySelector('#upload');
    this.list = root.querySelector('#job-list');
    this.detail = root.querySelector('#job-detail');
    this.error = root.querySelector('#train-error');
    this.view = null; // the JobView shown
    this.turn = 0; // counts show() and hide() calls
    this.base = null; // the served base model: the one jobs fine-tune
    this.upload.addEventListener('change', () => this.send());
    this.form.addEventListener('submit', (e) => { e.preventDefault(); this.start(); });
    for (const radio of this.form.elements.source) radio.addEventListener('change', () => this.pickMethod());
    for (const radio of this.form.elements.method) radio.addEventListener('change', () => this.layout());
    this.layout();
  }

  async show(id) {
    const turn = ++this.turn; // a later show() or hide() while this one waits wins
    try {
      if (!(await this.load()) || turn !== this.turn) return;
    } catch (err) {
      this.detail.replaceChildren(h('p', { class: 'error' }, `Could not reach the fine-tuning API: ${err.message}`));
      return;
    }
    if (this.view && this.view.id === id) return;
    this.view?.stop();
    this.view = null;
    if (!id) {
      this.detail.replaceChildren(h('p', { class: 'hint' }, 'Start a job, or open one to follow its loss curve and events.'));
      return;
    }
    const view = new JobView(id, { onChat: this.onChat, onChange: () => this.loadJobs() });
    this.view = view;
    this.detail.replaceChildren(view.el);
    this.markCurrent();
    await view.poll();
    if (this.view === view) view.el.querySelector('h2').focus();
  }

  hide() {
    this.turn += 1;
    this.view?.stop();
    this.view = null;
  }

  // Everything the form offers; false (and the server's sentence shown) where fine-tuning is off.
  async load() {
    const off = this.root.querySelector('#train-off');
    const on = [this.form, this.root.querySelector('#train-jobs'), this.detail];
    try {
      await this.loadFiles();
    } catch (err) {
      if (!(err instanceof APIError && err.status === 403)) throw err;
      off.textContent = err.message; // how to turn it on
      off.hidden = false;
      for (const el of on) el.hidden = true;
      return false;
    }
    off.hidden = true;
    for (const el of on) el.hidden = false;
    const [models, conversations] = await Promise.all([api('/v1/models'), api('/v1/conversations?limit=1000'),
      this.loadJobs(), this.loadFeedback()]);
    this.base = models.data.find((m) => m.parent === null)?.id ?? null;
    const count = conversations.data.length;
    this.root.querySelector('#count-conversations').textContent = count ? `(${count}${count === 1000 ? '+' : ''})` : '(none yet)';
    this.form.querySelector('input[value="conversations"]').disabled = !count;
    return true;
  }

  async loadFiles() {
    const keep = this.files.value;
    const { data } = await api('/v1/files?purpose=fine-tune');
    this.files.replaceChildren(...(data.length ? data.map((f) => h('option', { value: f.id },
      `${f.filename} · ${when(f.created_at)} · ${f.id}`)) : [h('option', { value: '' }, 'No file uploaded yet')]));
    if (data.some((f) => f.id === keep)) this.files.value = keep;
  }

  // The feedback files are offered once they hold records (GET /v1/feedback answers 404 without --feedback).
  async loadFeedback() {
    for (const kind of ['sft', 'preference']) {
      let kept = false;
      try {
        kept = (await api(`/v1/feedback?kind=${kind}&limit=1`)).data.length > 0;
      } catch (err) {
        if (!(err instanceof APIError && err.status === 404)) throw err;
      }
      this.root.querySelector(`#source-${kind}`).hidden = !kept;
    }
  }

  async loadJobs() {
    const { data } = await api(`${JOBS}?limit=100`);
    this.list.replaceChildren(...(data.length ? data.map((job) => h('li', { 'data-job': job.id },
      h('a', { href: `#train/${encodeURIComponent(job.id)}` }, job.user_provided_suffix || job.id),
      h('span', { class: `badge status-${job.status}` }, job.status.replaceAll('_', ' ')),
      h('span', { class: 'hint' }, ` ${job.fine_tuned_model ?? job.model} · ${when(job.created_at)}`)))
      : [h('li', { class: 'hint' }, 'No fine-tuning jobs yet.')]));
    this.markCurrent();
  }

  markCurrent() {
    for (const li of this.list.querySelectorAll('li[data-job]')) {
      li.setAttribute('aria-current', String(li.dataset.job === this.view?.id));
    }
  }

  // Preference pairs train with dpo, everything else supervised; the person may still choose otherwise.
  pickMethod() {
    this.form.elements.method.value = this.form.elements.source.value === 'feedback/preference' ? 'dpo' : 'supervised';
    this.layout();
  }

  layout() {
    this.root.querySelector('#train-beta').closest('label').hidden = this.form.elements.method.value !== 'dpo';
  }

  // An upload, as soon as a file is chosen: kept and picked, or its file:line problems shown.
  async send() {
    const file = this.upload.files[0];
    if (!file) return;
    const status = this.root.querySelector('#upload-status');
    const refused = this.root.querySelector('#upload-error');
    const body = new FormData();
    body.append('purpose', 'fine-tune');
    body.append('file', file);
    refused.textContent = '';
    status.textContent = `Uploading ${file.name}…`;
    try {
      const kept = await api('/v1/files', { body });
      await this.loadFiles();
      this.files.value = kept.id;
      this.form.elements.source.value = 'file';
      this.pickMethod();
      status.textContent = `Kept ${kept.filename} as ${kept.id}.`;
    } catch (err) {
      status.textContent = '';
      refused.textContent = err.message;
    } finally {
      this.upload.value = '';
    }
  }

  async start() {
    this.error.textContent = '';
    if (!this.form.reportValidity()) return;
    const source = this.form.elements.source.value;
    if (source === 'file' && !this.files.value) {
      this.error.textContent = 'Upload a training file first, or pick other training data.';
      return;
    }
    const button = this.root.querySelector('#train-start');
    button.disabled = true;
    try {
      const extra = this.extra();
      const file = source === 'file' ? this.files.value : (await api('/v1/files/import', { body: { source } })).id;
      const job = await api(JOBS, { body: this.request(file, extra) });
      location.hash = `#train/${encodeURIComponent(job.id)}`;
    } catch (err) {
      this.error.textContent = err.message;
    } finally {
      button.disabled = false;
    }
  }

  // The "more training config keys" box: a JSON object (the job's `tunesmith` field), or nothing.
  extra() {
    const text = this.root.querySelector('#train-config').value.trim();
    if (!text) return {};
    let keys;
    try {
      keys = JSON.parse(text);
    } catch (err) {
      throw new Error(`More training config keys: not JSON (${err.message}).`);
    }
    if (!keys || typeof keys !== 'object' || Array.isArray(keys)) {
      throw new Error('More training config keys: give a JSON object, e.g. {"method": {"name": "lora", "r": 16}}.');
    }
    return keys;
  }

  // POST /v1/fine_tuning/jobs as OpenAI's SDK sends it; an empty setting is left out ("auto": tunesmith's defaults).
  request(file, extra) {
    const type = this.form.elements.method.value;
    const number = (id) => {
      const raw = this.root.querySelector(`#${id}`).value.trim();
      return raw === '' ? undefined : Number(raw);
    };
    const hyperparameters = {};
    for (const [name, id] of Object.entries(SETTINGS)) {
      if (name === 'beta' && type !== 'dpo') continue;
      if (number(id) !== undefined) hyperparameters[name] = number(id);
    }
    const steps = number('train-steps');
    const tunesmith = steps === undefined ? extra : { ...extra, max_steps: steps };
    const suffix = this.root.querySelector('#train-suffix').value.trim();
    return { model: this.base, training_file: file, ...(suffix ? { suffix } : {}),
      method: { type, [type]: { hyperparameters } }, ...(Object.keys(tunesmith).length ? { tunesmith } : {}) };
  }
}
