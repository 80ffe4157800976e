// The loss curve of a run's log.jsonl as an inline SVG: train loss and, where the run evaluated, eval loss,
// against the step. No library: two polylines, their axes and a legend.

import { h, number } from './dom.js';

const NS = 'http://www.w3.org/2000/svg';
const SERIES = [['loss', 'train loss', 'series-train'], ['eval_loss', 'eval loss', 'series-eval']];

function s(tag, attrs = {}, ...children) {
  const el = document.createElementNS(NS, tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === 'text') el.textContent = value;
    else el.setAttribute(key, value);
  }
  el.append(...children);
  return el;
}

export function lossChart(points, { width = 640, height = 260 } = {}) {
  const series = SERIES.map(([key, label, cls]) => ({
    key, label, cls,
    points: points.filter((p) => Number.isFinite(p[key]) && Number.isFinite(p.step)).map((p) => [p.step, p[key]]),
  })).filter((line) => line.points.length);
  if (!series.length) return h('p', { class: 'hint' }, 'No loss logged (yet).');

  const all = series.flatMap((line) => line.points);
  const [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
  if (y0 === y1) [y0, y1] = [y0 - 0.5, y1 + 0.5];
  y0 = Math.min(0, y0); // losses are compared from zero: a drop looks as large as it is
  const pad = { left: 52, right: 12, top: 12, bottom: 34 };
  const x = (v) => pad.left + (x1 === x0 ? 0.5 : (v - x0) / (x1 - x0)) * (width - pad.left - pad.right);
  const y = (v) => height - pad.bottom - ((v - y0) / (y1 - y0)) * (height - pad.top - pad.bottom);

  const describe = series.map((line) => `${line.label} ${number(line.points[0][1])} at step ${line.points[0][0]} `
    + `to ${number(line.points.at(-1)[1])} at step ${line.points.at(-1)[0]}`).join('; ');
  const svg = s('svg', { viewBox: `0 0 ${width} ${height}`, class: 'chart', role: 'img', 'aria-label': `Loss curve: ${describe}` },
    s('title', { text: `Loss curve: ${describe}` }));
  const axes = s('g', { class: 'axes' },
    s('line', { x1: pad.left, y1: y(y0), x2: width - pad.right, y2: y(y0) }),
    s('line', { x1: pad.left, y1: pad.top, x2: pad.left, y2: y(y0) }));
  for (const v of [y0, (y0 + y1) / 2, y1]) {
    axes.append(s('line', { class: 'grid', x1: pad.left, y1: y(v), x2: width - pad.right, y2: y(v) }),
      s('text', { x: pad.left - 6, y: y(v) + 4, 'text-anchor': 'end', text: number(v) }));
  }
  for (const v of x1 === x0 ? [x0] : [x0, Math.round((x0 + x1) / 2), x1]) {
    axes.append(s('text', { x: x(v), y: height - pad.bottom + 16, 'text-anchor': 'middle', text: String(v) }));
  }
  axes.append(s('text', { x: width - pad.right, y: height - 4, 'text-anchor': 'end', text: 'step' }));
  svg.append(axes);
  for (const line of series) {
    const at = line.points.map(([px, py]) => `${x(px).toFixed(1)},${y(py).toFixed(1)}`).join(' ');
    svg.append(line.points.length > 1 ? s('polyline', { class: line.cls, points: at })
      : s('circle', { class: line.cls, cx: x(line.points[0][0]), cy: y(line.points[0][1]), r: 3 }));
  }
  const legend = h('p', { class: 'legend' }, series.map((line) => h('span', { class: line.cls }, line.label)));
  return h('figure', { class: 'loss' }, svg, legend);
}
