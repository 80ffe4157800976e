// One fine-tuning job as the Train view shows it: its status (and why it failed), what it trains, its loss
// curve drawn from its `metrics` events (chart.js, as a run's log.jsonl is drawn), its events as they come,
// Cancel while it is queued or running, and "Chat with it" once it succeeded. While it is not done it is read
// again every POLL_MS; that stops once it is done or no longer shown (`stop`).

import { api } from './api.js';
import { lossChart } from './chart.js';
import { h, number, tell, when } from './dom.js';

export const JOBS = '/v1/fine_tuning/jobs';
const DONE = ['succeeded', 'failed', 'cancelled'];
const POLL_MS = 1000;
const MAX_PAGES = 200; // of 100 events, read when a job opens: the events of 20,000 logged steps

// The loss-curve point of a `metrics` event: a step's training loss or an evaluation's validation loss. The mean
// loss said when training ends (with train_runtime) is no step's own and is left out.
function point(event) {
  const data = event.data || {};
  if (event.type !== 'metrics' || !Number.isFinite(data.step) || 'train_runtime' in data) return null;
  if (Number.isFinite(data.train_loss)) return { step: data.step, loss: data.train_loss };
  if (Number.isFinite(data.valid_loss)) return { step: data.step, eval_loss: data.valid_loss };
  return null;
}

export class JobView {
  constructor(id, { onChat, onChange }) {
    this.id = id;
    this.path = `${JOBS}/${encodeURIComponent(id)}`;
    this.onChat = onChat;
    this.onChange = onChange; // (job) => void: its status changed
    this.seen = new Set(); // ids of the events shown
    this.points = new Map(); // "loss:STEP" | "eval_loss:STEP" -> point: a step logged again after a restart counts once
    this.job = null;
    this.stopped = false;
    this.status = h('p', { class: 'job-status', role: 'status' });
    this.error = h('p', { class: 'error', role: 'alert' });
    this.actions = h('div', { class: 'row' });
    this.facts = h('dl', { class: 'facts' });
    this.chart = h('div', { class: 'job-chart' }, lossChart([]));
    this.events = h('ol', { class: 'events', role: 'log', 'aria-label': 'Events, oldest first' });
    this.el = h('article', { class: 'job', 'data-job': id }, h('h2', { tabindex: '-1' }, id), this.status,
      this.error, this.actions, this.facts, h('h3', {}, 'Loss'), this.chart, h('h3', {}, 'Events'), this.events);
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
  }

  // The job, then its new events: a job read as done has written all its events by then (the runner records
  // them before the status), so the last look misses none.
  async poll() {
    if (this.stopped) return;
    try {
      const job = await api(this.path);
      const fresh = await this.newEvents();
      if (this.stopped) return;
      this.show(job, fresh);
      if (DONE.includes(job.status)) return;
    } catch (err) {
      this.status.textContent = `Could not read the job (trying again): ${err.message}`;
    }
    if (!this.stopped) this.timer = setTimeout(() => this.poll(), POLL_MS);
  }

  // The events not shown yet, oldest first. The API lists them newest first, 100 a page, `after` going back.
  async newEvents() {
    const fresh = [];
    let after = null;
    for (let i = 0; i < MAX_PAGES; i += 1) {
      const page = await api(`${this.path}/events?limit=100${after ? `&after=${encodeURIComponent(after)}` : ''}`);
      for (const event of page.data) {
        if (this.seen.has(event.id)) return fresh.reverse();
        fresh.push(event);
      }
      if (!page.has_more) break;
      after = page.last_id;
    }
    return fresh.reverse();
  }

  show(job, fresh) {
    const changed = job.status !== this.job?.status;
    this.job = job;
    this.el.dataset.status = job.status;
    this.status.textContent = `Status: ${job.status.replaceAll('_', ' ')}`;
    this.error.textContent = job.error?.message ?? '';
    const facts = [['base model', job.model], ['training file', job.training_file], ['method', job.method?.type],
      ['fine-tuned model', job.fine_tuned_model], ['created', when(job.created_at)],
      ['finished', job.finished_at && when(job.finished_at)],
      ['trained tokens', job.trained_tokens && number(job.trained_tokens)], ['run directory', job.tunesmith?.run]];
    this.facts.replaceChildren(...facts.filter(([, v]) => v !== undefined && v !== null && v !== '')
      .map(([k, v]) => [h('dt', {}, k), h('dd', {}, String(v))]).flat());
    if (changed) {
      this.actions.replaceChildren(...this.buttons(job));
      this.onChange(job);
    }
    this.append(fresh);
  }

  append(fresh) {
    const follow = this.events.scrollTop + this.events.clientHeight >= this.events.scrollHeight - 4;
    let drawn = false;
    for (const event of fresh) {
      this.seen.add(event.id);
      this.events.append(h('li', { 'data-level': event.level },
        h('time', {}, new Date(event.created_at * 1000).toLocaleTimeString()), h('span', {}, event.message)));
      const p = point(event);
      if (p) {
        this.points.set(`${'loss' in p ? 'loss' : 'eval_loss'}:${p.step}`, p);
        drawn = true;
      }
    }
    if (drawn) this.chart.replaceChildren(lossChart([...this.points.values()].sort((a, b) => a.step - b.step)));
    if (follow) this.events.scrollTop = this.events.scrollHeight;
  }

  buttons(job) {
    if (job.status === 'succeeded' && job.fine_tuned_model) {
      return [h('button', { type: 'button', class: 'chat-with', onclick: () => this.onChat(job.fine_tuned_model) },
        'Chat with it'), h('span', { class: 'hint' }, `beside ${job.model}, served as ${job.fine_tuned_model}`)];
    }
    if (DONE.includes(job.status)) return [];
    const cancel = h('button', { type: 'button', class: 'cancel quiet' }, 'Cancel');
    cancel.addEventListener('click', async () => {
      cancel.disabled = true;
      try {
        const cancelled = await api(`${this.path}/cancel`, { method: 'POST' });
        this.show(cancelled, await this.newEvents());
        tell(`Cancelled ${this.id}.`);
      } catch (err) {
        cancel.disabled = false;
        tell(`Could not cancel: ${err.message}`, 'error');
      }
    });
    return [cancel];
  }
}
