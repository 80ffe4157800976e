// The playground: one or two panes, each with its own model, sent the same message or prompt. Chat mode keeps
// each pane's conversation on the server (/v1/conversations + `conversation` on /v1/chat/completions), so a
// reply is stored only once it is complete; completion mode sends the raw prompt to /v1/completions, no
// template. Stop aborts the streams: the server cancels a generation whose client hung up. When the server
// keeps feedback, each finished chat reply gets 👍/👎 and Edit, and two panes' replies "Prefer this one"
// (feedback.js); a pane keeps the conversation as plain messages (`history`) for the prompt each gesture sends.

import { APIError, api, stream } from './api.js';
import { clearNotice, download, h, tell, when } from './dom.js';
import { feedbackKept, judge, prefer } from './feedback.js';

class Pane {
  constructor(playground, index) {
    this.playground = playground;
    this.index = index;
    this.el = document.getElementById('pane-template').content.firstElementChild.cloneNode(true);
    this.el.dataset.pane = String(index);
    this.el.setAttribute('aria-label', `Pane ${index + 1}`);
    this.select = this.el.querySelector('.model');
    this.transcript = this.el.querySelector('.transcript');
    this.select.addEventListener('change', () => this.reset());
    this.el.querySelector('.save').addEventListener('click', () => this.save());
    this.reset();
  }

  get model() {
    return this.select.value;
  }

  reset() {
    this.conversation = null; // {id, model, system, ...} as the server returned it
    this.turns = 0; // replies stored in it
    this.history = []; // its messages as {role, content}; null when it holds more than text (tool calls)
    this.records = []; // completion mode: finished {prompt, completion} pairs
    this.transcript.replaceChildren(h('p', { class: 'empty hint' },
      this.playground.mode === 'chat' ? 'Send a message to start a conversation.' : 'Send a prompt: it is completed as it is.'));
  }

  bubble(role, text = '', meta = '') {
    this.transcript.querySelector('.empty')?.remove();
    const body = h('div', { class: 'body' }, text);
    const el = h('article', { class: `msg ${role}` }, h('div', { class: 'who' }, meta ? `${role} · ${meta}` : role), body);
    this.transcript.append(el);
    return { el, body };
  }

  follow() {
    this.transcript.scrollTop = this.transcript.scrollHeight;
  }

  // A reply being streamed: aria-busy holds the screen reader's announcement until it is complete.
  async streamInto(target, path, body, signal, piece) {
    target.el.dataset.state = 'streaming';
    target.el.setAttribute('aria-busy', 'true');
    let text = '';
    let finish = null;
    try {
      for await (const chunk of stream(path, body, signal)) {
        const choice = chunk.choices?.[0];
        if (!choice) continue;
        const more = piece(choice);
        if (more) {
          text += more;
          target.body.append(more);
          this.follow();
        }
        finish = choice.finish_reason || finish;
      }
      target.el.dataset.state = 'done';
      if (finish === 'length') target.el.append(h('p', { class: 'meta' }, 'stopped at max tokens'));
      return text;
    } catch (err) {
      const stopped = err.name === 'AbortError';
      target.el.dataset.state = stopped ? 'stopped' : 'error';
      target.el.append(h('p', { class: stopped ? 'meta' : 'meta error' },
        stopped ? 'stopped: this reply is not kept' : `error: ${err.message}`));
      return null;
    } finally {
      target.el.removeAttribute('aria-busy');
      this.follow();
    }
  }

  async chat(text, params, signal) {
    if (!this.conversation) {
      const system = this.playground.system.value.trim();
      try {
        this.conversation = await api('/v1/conversations', {
          body: { model: this.model, system: system || null, metadata: { title: text.slice(0, 80), source: 'playground' } },
        });
      } catch (err) {
        this.bubble('assistant', '', this.model).el.append(h('p', { class: 'meta error' }, `error: ${err.message}`));
        return;
      }
      if (system) this.bubble('system', system);
      this.history = system ? [{ role: 'system', content: system }] : [];
    }
    this.bubble('user', text);
    const reply = this.bubble('assistant', '', this.model);
    const body = { model: this.model, messages: [{ role: 'user', content: text }], conversation: this.conversation.id, ...params };
    const done = await this.streamInto(reply, '/v1/chat/completions', body, signal, (choice) => choice.delta?.content);
    if (done === null) {
      if (this.turns === 0) { // nothing of it was stored: leave no empty conversation behind
        api(`/v1/conversations/${encodeURIComponent(this.conversation.id)}`, { method: 'DELETE' }).catch(() => {});
        this.conversation = null;
      }
      return null;
    }
    this.turns += 1;
    if (!this.history) return null;
    const prompt = [...this.history, { role: 'user', content: text }];
    this.history = [...prompt, { role: 'assistant', content: done }];
    if (await this.playground.feedback) judge(reply, prompt, done);
    return { message: reply, prompt, text: done };
  }

  async complete(text, params, signal) {
    const block = this.bubble('completion', '', this.model);
    block.body.append(h('span', { class: 'prompt' }, text));
    const out = { el: block.el, body: block.body.appendChild(h('span', { class: 'completion' })) };
    const done = await this.streamInto(out, '/v1/completions', { model: this.model, prompt: text, ...params }, signal,
      (choice) => choice.text);
    if (done !== null) this.records.push({ prompt: text, completion: done });
  }

  // "Save as training data": the conversation as the server stored it (complete turns only), one OpenAI chat
  // JSONL record; in completion mode the finished {prompt, completion} pairs, tunesmith's completion format.
  async save() {
    if (this.playground.mode === 'completion') {
      if (!this.records.length) return tell('Nothing to save yet: no completion has finished in this pane.');
      const lines = this.records.map((r) => JSON.stringify(r)).join('\n');
      return download(`completions-${this.model}.jsonl`, `${lines}\n`);
    }
    if (!this.conversation || !this.turns) return tell('Nothing to save yet: no reply has been kept in this pane.');
    const id = encodeURIComponent(this.conversation.id);
    const [conversation, stored] = await Promise.all([api(`/v1/conversations/${id}`), api(`/v1/conversations/${id}/messages`)]);
    const messages = stored.data.map(({ role, content }) => ({ role, content }));
    if (conversation.system) messages.unshift({ role: 'system', content: conversation.system });
    download(`${conversation.id}.jsonl`, `${JSON.stringify({ messages })}\n`);
    tell(`Saved ${messages.length} messages as one chat record (OpenAI JSONL).`);
  }

  async open(conversation) {
    const stored = await api(`/v1/conversations/${encodeURIComponent(conversation.id)}/messages`);
    const served = [...this.select.options].some((o) => o.value === conversation.model && !o.disabled);
    if (served) this.select.value = conversation.model;
    this.reset();
    this.conversation = conversation;
    this.turns = stored.data.filter((m) => m.role === 'assistant').length;
    if (conversation.system) this.bubble('system', conversation.system);
    let history = conversation.system ? [{ role: 'system', content: conversation.system }] : [];
    const kept = await this.playground.feedback;
    for (const m of stored.data) {  // a tool-call turn has no content: show its calls
      const text = m.content ?? (m.tool_calls ? JSON.stringify(m.tool_calls.map((c) => c.function)) : '');
      const bubble = this.bubble(m.role, text, m.role === 'assistant' ? conversation.model : '');
      if (!['user', 'assistant'].includes(m.role) || typeof m.content !== 'string') history = null;
      if (!history) continue;
      if (kept && m.role === 'assistant' && history.at(-1)?.role === 'user') judge(bubble, [...history], m.content);
      history.push({ role: m.role, content: m.content });
    }
    this.history = history;
    if (!served && conversation.model) {
      tell(`This conversation was held with ${conversation.model}, which is not served now; it goes on with ${this.model}.`);
    }
    this.follow();
  }
}

export class Playground {
  constructor(root) {
    this.root = root;
    this.settings = root.querySelector('#settings');
    this.system = root.querySelector('#system');
    this.compare = root.querySelector('#compare');
    this.prompt = root.querySelector('#prompt');
    this.sendButton = root.querySelector('#send');
    this.stopButton = root.querySelector('#stop');
    this.list = root.querySelector('#conversation-list');
    this.controller = null;
    this.models = [];
    this.feedback = null; // a promise: whether the server keeps feedback (asked once the models load)
    this.panes = [new Pane(this, 0), new Pane(this, 1)];
    root.querySelector('#panes').append(...this.panes.map((p) => p.el));

    root.querySelector('#composer').addEventListener('submit', (e) => { e.preventDefault(); this.send(); });
    this.prompt.addEventListener('keydown', (e) => {
      if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) { e.preventDefault(); this.send(); }
      if (e.key === 'Escape') this.stop();
    });
    this.stopButton.addEventListener('click', () => this.stop());
    this.compare.addEventListener('change', () => this.layout());
    for (const radio of this.settings.elements.mode) radio.addEventListener('change', () => this.layout(true));
    root.querySelector('#new-conversation').addEventListener('click', () => this.newConversation());
    root.querySelector('#refresh-conversations').addEventListener('click', () => this.loadConversations());
    if (matchMedia('(max-width: 48rem)').matches) root.querySelector('#conversations').open = false;
    this.layout();
  }

  get mode() {
    return this.settings?.elements.mode.value ?? 'chat';
  }

  get active() {
    return this.compare.checked ? this.panes : this.panes.slice(0, 1);
  }

  layout(modeChanged = false) {
    this.panes[1].el.hidden = !this.compare.checked;
    const chat = this.mode === 'chat';
    this.root.querySelector('#system-box').hidden = !chat;
    this.root.querySelector('#prompt-label').textContent = chat ? 'Message' : 'Prompt';
    if (modeChanged) for (const pane of this.panes) pane.reset();
  }

  params() {
    const value = (id) => {
      const raw = this.root.querySelector(`#${id}`).value.trim();
      return raw === '' ? undefined : Number(raw);
    };
    return { temperature: value('temperature'), top_p: value('top_p'), max_tokens: value('max_tokens'), seed: value('seed') };
  }

  async loadModels() {
    const { data } = await api('/v1/models');
    this.feedback ??= feedbackKept(); // asked now, with the key that /v1/models took
    this.models = data;
    const generative = data.filter((m) => m.task === 'sft');
    this.panes.forEach((pane, i) => {
      const keep = pane.model;
      pane.select.replaceChildren(...data.map((m) => h('option', { value: m.id, disabled: m.task !== 'sft' },
        m.task === 'sft' ? m.id : `${m.id} (${m.task}: no text generation)`)));
      const fallback = (generative[Math.min(i, generative.length - 1)] || data[0])?.id;
      pane.select.value = data.some((m) => m.id === keep && m.task === 'sft') ? keep : fallback;
    });
    if (!this.loaded) { // first load: compare base and the first run when there is one
      this.compare.checked = generative.length > 1;
      this.loaded = true;
    }
    this.layout();
  }

  // Show `model` in a pane beside the base model (from the runs view: "Chat with this run").
  chatWith(model) {
    this.compare.checked = true;
    this.layout();
    const base = this.models.find((m) => m.parent === null)?.id;
    for (const [pane, name] of [[this.panes[0], base], [this.panes[1], model]]) {
      if (name && pane.model !== name) { pane.select.value = name; pane.reset(); }
    }
    this.prompt.focus();
  }

  async send() {
    const text = this.prompt.value;
    if (!text.trim() || this.controller) return;
    if (!this.settings.reportValidity()) return;
    clearNotice();
    this.controller = new AbortController();
    this.busy(true);
    this.prompt.value = '';
    const params = this.params();
    const signal = this.controller.signal;
    try {
      const replies = await Promise.all(this.active.map((pane) => (this.mode === 'chat'
        ? pane.chat(text, params, signal) : pane.complete(text, params, signal))));
      if (replies.length === 2 && replies.every(Boolean) && await this.feedback) prefer(...replies);
    } finally {
      this.controller = null;
      this.busy(false);
      if (document.activeElement === this.stopButton || document.activeElement === document.body) this.prompt.focus();
    }
    if (this.mode === 'chat') this.loadConversations();
  }

  // While replies stream, what would reset a pane under them (its model, the mode, the second pane) waits.
  busy(on) {
    this.sendButton.disabled = on;
    this.stopButton.disabled = !on;
    for (const el of [...this.panes.map((p) => p.select), ...this.settings.elements.mode, this.compare]) el.disabled = on;
  }

  stop() {
    this.controller?.abort();
  }

  newConversation() {
    this.stop();
    for (const pane of this.panes) pane.reset();
    this.renderList(this.conversations || []);
    this.prompt.focus();
  }

  async loadConversations() {
    try {
      this.conversations = (await api('/v1/conversations?limit=100')).data;
      this.renderList(this.conversations);
    } catch (err) {
      if (!(err instanceof APIError && err.status === 401)) tell(`Could not list conversations: ${err.message}`, 'error');
    }
  }

  renderList(conversations) {
    const current = new Set(this.panes.map((p) => p.conversation?.id).filter(Boolean));
    if (!conversations.length) {
      this.list.replaceChildren(h('li', { class: 'hint' }, 'None yet.'));
      return;
    }
    this.list.replaceChildren(...conversations.map((c) => {
      const title = c.metadata?.title || c.id;
      return h('li', { 'aria-current': current.has(c.id) ? 'true' : null },
        h('button', { type: 'button', class: 'open', onclick: () => this.open(c) }, h('span', { class: 'title' }, title),
          h('span', { class: 'hint' }, `${c.model || 'any model'} · ${when(c.created_at)}`)),
        h('button', { type: 'button', class: 'delete quiet', 'aria-label': `Delete conversation “${title}”`,
          onclick: () => this.remove(c) }, '×'));
    }));
  }

  async open(conversation) {
    if (this.controller) return tell('Stop the reply being generated first.');
    if (this.mode !== 'chat') {
      this.settings.elements.mode.value = 'chat';
      this.layout(true);
    }
    try {
      await this.panes[0].open(conversation);
    } catch (err) {
      tell(`Could not open the conversation: ${err.message}`, 'error');
    }
    this.renderList(this.conversations || []);
    this.prompt.focus();
  }

  async remove(conversation) {
    try {
      await api(`/v1/conversations/${encodeURIComponent(conversation.id)}`, { method: 'DELETE' });
    } catch (err) {
      if (!(err instanceof APIError && err.status === 404)) return tell(`Could not delete: ${err.message}`, 'error');
    }
    for (const pane of this.panes) if (pane.conversation?.id === conversation.id) pane.reset();
    await this.loadConversations();
  }
}
