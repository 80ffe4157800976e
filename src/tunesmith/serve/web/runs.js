// The runs browser: the runs under `tunesmith serve --runs DIR` (GET /v1/runs, /v1/runs/{id}) and the
// compare/continual reports there (GET /v1/reports/{id}, shown in a sandboxed iframe: no script of a report
// runs, and it cannot reach the page). A run opens with its scores, loss curve and lineage, and "Chat with this
// run" loads it into the server (POST /v1/load_lora_adapter) and opens it beside the base model.

import { api } from './api.js';
import { lossChart } from './chart.js';
import { h, number, tell, when } from './dom.js';

const link = (kind, id, text) => h('a', { href: `#${kind}/${encodeURIComponent(id)}` }, text ?? id);
const TRAIN_FIELDS = ['train_loss', 'wall_seconds', 'tokens_per_second', 'trainable_parameters', 'total_parameters', 'examples'];

function headline(run) {
  const key = Object.keys(run.after).find((k) => k !== 'loss' && k !== 'perplexity') ?? Object.keys(run.after)[0];
  if (key === undefined) return run.status === 'finished' ? '—' : run.status;
  const before = run.before[key];
  return `${key} ${before === undefined ? '' : `${number(before)} → `}${number(run.after[key])}`;
}

export class Runs {
  constructor(root, { onChat }) {
    this.root = root;
    this.onChat = onChat;
    this.table = root.querySelector('#runs-table tbody');
    this.reports = root.querySelector('#reports-list');
    this.detail = root.querySelector('#run-detail');
  }

  async load() {
    const [found, reports] = await Promise.all([api('/v1/runs'), api('/v1/reports')]);
    this.root.querySelector('#runs-root').textContent = found.root
      ? `Under ${found.root}.` : 'This server lists no runs: start it with tunesmith serve --runs DIR.';
    this.table.replaceChildren(...(found.data.length ? found.data.map((run) => h('tr', { 'data-run': run.id },
      h('th', { scope: 'row' }, link('runs', run.id), run.status === 'finished' ? null : h('span', { class: 'badge' }, run.status)),
      h('td', {}, run.task ?? '—'), h('td', {}, run.method ?? '—'), h('td', {}, run.base_model ?? '—'),
      h('td', {}, headline(run)), h('td', {}, when(run.modified))))
      : [h('tr', {}, h('td', { colspan: 6, class: 'hint' }, found.root ? 'No runs here yet.' : '—'))]));
    this.reports.replaceChildren(...(reports.data.length ? reports.data.map((r) => h('li', {},
      link('reports', r.id, r.title), h('span', { class: 'hint' }, ` ${r.kind} · ${r.id} · ${when(r.modified)}`)))
      : [h('li', { class: 'hint' }, 'No compare or continual reports here.')]));
  }

  async show(kind, id) {
    try {
      await this.load();
    } catch (err) {
      this.detail.replaceChildren(h('p', { class: 'error' }, `Could not list runs: ${err.message}`));
      return;
    }
    if (!id) {
      this.detail.replaceChildren(h('p', { class: 'hint' }, 'Open a run to see its scores, loss curve and lineage, or a report.'));
      return;
    }
    try {
      this.detail.replaceChildren(kind === 'reports' ? await this.report(id) : await this.run(id));
    } catch (err) {
      this.detail.replaceChildren(h('p', { class: 'error', role: 'alert' }, err.message));
    }
    this.detail.querySelector('h2')?.focus();
  }

  async run(id) {
    const run = await api(`/v1/runs/${encodeURIComponent(id)}`);
    const facts = [['status', run.status], ['task', run.task], ['method', run.method], ['base model', run.base_model],
      ['labels', run.labels?.join(', ')], ['train data', run.data?.train && `${run.data.train.path} (${run.data.train.examples} examples)`],
      ['eval data', run.data?.eval && `${run.data.eval.path} (${run.data.eval.examples} examples)`],
      ['replay', run.replay && `${run.replay.count} of ${run.replay.pool} earlier examples`],
      ['regularization', run.regularization && JSON.stringify(run.regularization)], ['directory', run.path]];
    return h('article', { class: 'run', 'data-run': run.id },
      h('h2', { tabindex: '-1' }, run.id),
      this.actions(run),
      h('dl', { class: 'facts' }, facts.filter(([, v]) => v !== undefined && v !== null && v !== '')
        .map(([k, v]) => [h('dt', {}, k), h('dd', {}, String(v))])),
      h('h3', {}, 'Scores'), this.scores(run),
      h('h3', {}, 'Loss'), lossChart(run.log),
      h('h3', {}, 'Lineage'), this.lineage(run),
      run.config ? h('details', {}, h('summary', {}, 'train_config.yaml'), h('pre', {}, run.config)) : null);
  }

  actions(run) {
    if (run.task !== 'sft' || run.status !== 'finished') {
      return h('p', { class: 'hint' }, run.task !== 'sft' ? `A ${run.task} run answers POST /classify, not chat.`
        : 'An unfinished run cannot be served yet.');
    }
    const label = run.served_as.length ? `Chat with it (served as ${run.served_as[0]})` : 'Load and chat with it';
    const button = h('button', { type: 'button', class: 'chat-with' }, label);
    button.addEventListener('click', async () => {
      button.disabled = true;
      try {
        let name = run.served_as[0];
        if (!name) {
          tell(`Loading ${run.id}…`);
          await api('/v1/load_lora_adapter', { body: { lora_name: run.id, lora_path: run.path }, raw: true });
          name = run.id;
          tell(`Loaded ${run.id}: it is served as ${name} until the server stops.`);
        }
        await this.onChat(name);
      } catch (err) {
        tell(`Could not load the run: ${err.message}`, 'error');
      } finally {
        button.disabled = false;
      }
    });
    return h('p', { class: 'row' }, button);
  }

  scores(run) {
    const keys = [...new Set([...Object.keys(run.metrics.before ?? {}), ...Object.keys(run.metrics.after ?? {})])];
    const train = TRAIN_FIELDS.filter((k) => run.metrics.train?.[k] !== undefined);
    if (!keys.length && !train.length) return h('p', { class: 'hint' }, 'No metrics.json yet.');
    const before = run.before_kind ? `before (${run.before_kind})` : 'before';
    const head = ['metric', before, 'after'].map((text) => h('th', { scope: 'col' }, text));
    const rows = keys.map((k) => h('tr', {}, h('th', { scope: 'row' }, k),
      h('td', {}, number(run.metrics.before?.[k])), h('td', {}, number(run.metrics.after?.[k]))));
    const stats = train.map((k) => `${k.replaceAll('_', ' ')} ${number(run.metrics.train[k])}`).join(' · ');
    return h('div', {},
      keys.length ? h('div', { class: 'table-wrap' },
        h('table', { class: 'scores' }, h('thead', {}, h('tr', {}, head)), h('tbody', {}, rows))) : null,
      train.length ? h('p', { class: 'hint' }, stats) : null);
  }

  lineage(run) {
    const entry = (e) => h('li', {}, e.id ? link('runs', e.id) : h('code', {}, e.path),
      h('span', { class: 'hint' }, ` ${e.method ?? ''} ${e.task ?? ''}`));
    const here = h('li', { 'aria-current': 'true' }, h('strong', {}, run.id), h('span', { class: 'hint' }, ' (this run)'));
    const chain = [...run.lineage.map(entry), here];
    return h('div', {},
      h('ol', { class: 'lineage' }, chain),
      run.lineage.length ? null : h('p', { class: 'hint' }, `Trained from the base model ${run.base_model ?? ''}.`),
      run.children.length
        ? h('p', {}, 'Continued by: ', run.children.flatMap((c, i) => [i ? ', ' : '', link('runs', c)])) : null);
  }

  async report(id) {
    const response = await api(`/v1/reports/${encodeURIComponent(id)}`, { raw: true });
    const html = await response.text();
    // sandbox with no allowances: the report's HTML renders (inline styles, embedded plots), nothing in it runs.
    const frame = h('iframe', { class: 'report', title: `Report ${id}`, sandbox: '' });
    frame.srcdoc = html;
    return h('article', { class: 'report-view' }, h('h2', { tabindex: '-1' }, id), frame);
  }
}
