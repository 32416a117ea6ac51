/**
 * remote_magic for JupyterLab: a "Remote training" sidebar listing every job
 * this machine submitted (grouped by host, with each host's GPUs; a sweep's
 * trials under one entry; finished jobs folded) and a status bar item counting
 * the running and queued ones. Data comes from the server extension's REST API
 * (/remote-magic/api), which talks to the hosts through the same session
 * layer as the magics.
 */
import {
  ILabShell,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { Clipboard, Dialog, showDialog } from '@jupyterlab/apputils';
import { URLExt } from '@jupyterlab/coreutils';
import { NotebookActions } from '@jupyterlab/notebook';
import { ServerConnection } from '@jupyterlab/services';
import { IStatusBar } from '@jupyterlab/statusbar';
import { checkIcon, closeIcon, copyIcon, LabIcon, listIcon } from '@jupyterlab/ui-components';
import { Widget } from '@lumino/widgets';
import { widgetFallbackPlugin } from './widgetfallback';

const PLUGIN_ID = 'remote-magic-labextension:plugin';
const PANEL_ID = 'remote-magic-jobs';
// How often the list is asked for: while a job runs; while a cell that may submit one runs here (a blocking
// cell's job then appears as soon as its kernel records it); otherwise (a job from another kernel or a terminal
// appears; the server answers "unchanged" without asking the hosts until the registry changes).
const POLL_MS = 3000;
const WATCH_MS = 1000;
const IDLE_MS = 10000;
const COPIED_MS = 1500;
// A cell whose end this lab never heard of (its kernel died) stops counting as running after this long.
const WATCH_LIMIT_MS = 10 * 60 * 1000;
const RUNNING = new Set(['queued', 'running', 'requeued']);  // requeued: back in a scheduler's queue
const QUEUED = new Set(['queued', 'requeued']);
// Neither running nor finished: the host did not answer, the job may still run.
const UNKNOWN = new Set(['unreachable']);
const FAILED = new Set(['error', 'killed']);
// Jobs the user cleared from the list (``host/job_id``); only this browser forgets them, the hosts keep them.
const CLEARED_KEY = 'remote-magic:cleared-jobs';

interface ISweep {
  id: string;
  trial: number;
  params?: Record<string, unknown>;
  parallel?: number | null;
  metric?: string | null;
  mode?: string | null;
  name?: string | null;
}

interface IJob {
  host: string;
  job_id: string;
  name?: string | null;
  title?: string | null;
  sweep?: ISweep | null;
  state: string;
  epoch?: number | null;
  epochs?: number | null;
  logs?: Record<string, number>;
  started?: number | null;
  ended?: number | null;
  submitted?: number | null;
  message?: string | null;
  reason?: string | null;
  position?: number | null;
}

interface IGpu {
  index: number;
  name: string;
  memory_used: number | string;
  memory_total: number | string;
  utilization: number | string;
  holder?: string | null;
  job_id?: string | null;
}

interface IHostGpus {
  host: string;
  gpus: IGpu[];
  error: string | null;
}

interface IEvent {
  seq: number;
  type: string;
  text?: string;
}

/** What the sidebar lists: one job, or the trials of one sweep under a single entry. */
interface IEntry {
  key: string;
  sweep: ISweep | null;
  jobs: IJob[];
}

/** The one helper that calls the server extension (auth and XSRF handled by ServerConnection). */
async function requestAPI<T>(endPoint: string, init: RequestInit = {}, query = ''): Promise<T> {
  const settings = ServerConnection.makeSettings();
  const url = URLExt.join(settings.baseUrl, 'remote-magic', 'api', endPoint) + query;
  const response = await ServerConnection.makeRequest(url, init, settings);
  const text = await response.text();
  if (!response.ok) {
    let message = text;
    try {
      message = JSON.parse(text).message || text;
    } catch {
      // keep the raw text
    }
    throw new ServerConnection.ResponseError(response, message);
  }
  return JSON.parse(text) as T;
}

const ICON = new LabIcon({
  name: 'remote-magic:jobs',
  svgstr:
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24"><path class="jp-icon3" fill="#616161" ' +
    'd="M4 5h16v10H4zM2 17h20v2H2zM6 7v6h2V7zm4 3v3h2v-3zm4-2v5h2V8z"/></svg>'
});

// State icons drawn as inline SVG (colour from CSS): glyphs such as U+23F9 are missing from the
// browser's default fonts and show as a box.
// The white strokes inside a filled icon (class jp-RemoteMagic-knockout) take the panel's background from CSS.
const stroke = (width = 1.6) =>
  `fill="none" stroke="currentColor" stroke-width="${width}" stroke-linecap="round" stroke-linejoin="round"`;
const STATE_SVG: Record<string, string> = {
  queued: `<circle cx="8" cy="8" r="6.2" ${stroke()}/><path d="M8 4.6V8l2.4 1.6" ${stroke()}/>`,
  requeued: `<path d="M12.8 6.2A5 5 0 1 0 13 9.4" ${stroke()}/><path d="M13.2 2.8v3.6H9.6" ${stroke()}/>`,
  running: '<path d="M4.5 2.8v10.4L13 8z" fill="currentColor"/>',
  done: `<path d="M2.8 8.4l3.4 3.4L13.2 4.6" ${stroke(2)}/>`,
  stopped: '<rect x="3.5" y="3.5" width="9" height="9" rx="1.2" fill="currentColor"/>',
  error:
    '<circle cx="8" cy="8" r="6.8" fill="currentColor"/>' +
    `<path class="jp-RemoteMagic-knockout" d="M5.6 5.6l4.8 4.8m0-4.8l-4.8 4.8" ${stroke(1.6)}/>`,
  cancelled: `<circle cx="8" cy="8" r="6.2" ${stroke()}/><path d="M3.8 12.2l8.4-8.4" ${stroke()}/>`,
  killed: `<path d="M3.5 3.5l9 9m0-9l-9 9" ${stroke(2.2)}/>`,
  unreachable:
    '<path d="M8 1.6l6.9 12.2H1.1z" fill="currentColor"/>' +
    `<path class="jp-RemoteMagic-knockout" d="M8 6.2v3.4M8 11.6v.1" ${stroke(1.6)}/>`,
  gone: `<circle cx="8" cy="8" r="6.2" ${stroke()} stroke-dasharray="2.4 2.2"/>`,
  unknown: '<circle cx="8" cy="8" r="3.2" fill="currentColor"/>'
};

function stateIcon(state: string): HTMLSpanElement {
  const icon = element('span', 'jp-RemoteMagic-icon');
  icon.innerHTML = // fixed markup only, never text from a job
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16" width="12" height="12" aria-hidden="true">' +
    `${STATE_SVG[state] || STATE_SVG.unknown}</svg>`;
  return icon;
}

function isFinished(job: IJob): boolean {
  return !RUNNING.has(job.state) && !UNKNOWN.has(job.state);
}

function jobKey(job: IJob): string {
  return `${job.host}/${job.job_id}`;
}

/** The job's one-line title: its name, else the cell's first statement (from the host), else its id. */
function jobTitle(job: IJob): string {
  return job.title || job.name || job.job_id;
}

function formatParams(params: Record<string, unknown> | undefined): string {
  return Object.entries(params || {})
    .map(([name, value]) => `${name}=${typeof value === 'string' ? value : JSON.stringify(value)}`)
    .join(', ');
}

function trialLabel(sweep: ISweep): string {
  const params = formatParams(sweep.params);
  return params ? `#${sweep.trial} ${params}` : `#${sweep.trial}`;
}

function formatMetric(value: number): string {
  return Math.abs(value) >= 1000 || (value !== 0 && Math.abs(value) < 0.001)
    ? value.toExponential(2)
    : value.toFixed(4);
}

function formatSeconds(seconds: number): string {
  if (seconds < 60) {
    return `${seconds.toFixed(0)}s`;
  }
  const minutes = Math.floor(seconds / 60);
  if (minutes < 60) {
    return `${minutes}m${String(Math.floor(seconds % 60)).padStart(2, '0')}s`;
  }
  return `${Math.floor(minutes / 60)}h${String(minutes % 60).padStart(2, '0')}m`;
}

/** MiB as GiB, as short as it reads well: 0, 0.5, 12, 80. */
function formatGiB(mib: number | string): string {
  if (typeof mib !== 'number') {
    return '?';
  }
  return mib === 0 ? '0' : (mib / 1024).toFixed(mib < 10240 ? 1 : 0);
}

function element<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  className: string,
  text?: string
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  node.className = className;
  if (text !== undefined) {
    node.textContent = text;
  }
  return node;
}

/** A row action as JupyterLab's Running panel draws them: an icon button, named for screen readers and on hover. */
function iconButton(icon: LabIcon, className: string, label: string, focusKey: string): HTMLButtonElement {
  const button = element('button', `jp-RemoteMagic-action ${className}`);
  button.type = 'button';
  button.title = label;
  button.setAttribute('aria-label', label);
  button.dataset.focusKey = focusKey;
  button.appendChild(icon.element({ tag: 'span', className: 'jp-RemoteMagic-actionicon' }));
  return button;
}

/** Enter and Space on ``node`` itself (not on a button inside it) do what a click does. */
function onActivate(node: HTMLElement, act: () => void): void {
  node.addEventListener('keydown', event => {
    if (event.target === node && (event.key === 'Enter' || event.key === ' ')) {
      event.preventDefault();
      act();
    }
  });
}

/**
 * A fold that stays open across the refreshes that re-render the list: ``open`` holds the keys of the
 * open ones, updated on the click itself (a ``toggle`` event comes later, maybe after a re-render).
 */
function foldable(fold: HTMLDetailsElement, summary: HTMLElement, open: Set<string>, key: string): void {
  fold.open = open.has(key);
  summary.dataset.focusKey = `fold:${key}`;
  summary.onclick = event => {
    event.preventDefault();
    fold.open = !fold.open;
    if (fold.open) {
      open.add(key);
    } else {
      open.delete(key);
    }
  };
}

/** How a sweep ranks its trials: its own metric and mode, else the first validation metric (min for losses). */
function sweepMetric(sweep: ISweep, trials: IJob[]): { metric: string; mode: string } | null {
  let metric = sweep.metric || null;
  if (!metric) {
    const names = trials.flatMap(job => Object.keys(job.logs || {}));
    metric = names.find(name => name.startsWith('val_')) || names.find(name => name === 'loss') || names[0] || null;
  }
  if (!metric) {
    return null;
  }
  const maximise = /acc|auc|precision|recall|f1|score|iou|r2/i.test(metric) && !/loss|error/i.test(metric);
  return { metric, mode: sweep.mode || (maximise ? 'max' : 'min') };
}

/** "1 running · 2 done · 1 failed": a sweep's trials counted by what they are doing. */
function stateCounts(trials: IJob[]): string {
  const counts = new Map<string, number>();
  for (const job of trials) {
    const word = FAILED.has(job.state) ? 'failed' : job.state;
    counts.set(word, (counts.get(word) || 0) + 1);
  }
  const order = ['running', 'queued', 'requeued', 'done', 'failed', 'stopped', 'cancelled', 'unreachable', 'gone'];
  const words = [...counts.keys()].sort((a, b) => order.indexOf(a) - order.indexOf(b));
  return words.map(word => `${counts.get(word)} ${word}`).join(' · ');
}

/** The state a sweep shows as a whole: running while any trial runs, error when none finished well. */
function sweepState(trials: IJob[]): string {
  for (const state of ['running', 'requeued', 'queued', 'unreachable', 'done']) {
    if (trials.some(job => job.state === state)) {
      return state;
    }
  }
  return trials[0]?.state || 'unknown';
}

/** The sidebar: jobs grouped by host, each host's GPUs, sweeps as one entry; refreshed while any job runs. */
class JobsPanel extends Widget {
  jobs: IJob[] = [];
  gpus = new Map<string, IHostGpus>();
  onChange: (running: number, queued: number) => void = () => undefined;
  private timer: number | null = null;
  // The registry version the list was read at: while nothing runs, the server answers "unchanged" to it cheaply.
  private registry: string | null = null;
  // Cells (by model id) that may submit a job, running in this lab now, with when each started.
  private watched = new Map<string, number>();
  // Jobs whose attach command was just copied (key -> until when "Copied" shows).
  private copied = new Map<string, number>();
  private list: HTMLDivElement;
  private status: HTMLDivElement;
  private footer: HTMLDivElement;
  private cleared: Set<string>;
  // What the user opened stays open across the refreshes that re-render the list.
  private openSweeps = new Set<string>();
  private openFinished = new Set<string>();
  private logs = new Map<string, { text: string[]; next: number }>();

  constructor() {
    super();
    this.id = PANEL_ID;
    this.addClass('jp-RemoteMagic-panel');
    this.node.tabIndex = -1;  // focusable from code only: it holds the focus while the list is rebuilt
    this.title.icon = ICON;
    this.title.caption = 'Remote training';
    const header = element('div', 'jp-RemoteMagic-header');
    header.appendChild(element('h2', 'jp-RemoteMagic-title', 'Remote training'));
    const refresh = element('button', 'jp-RemoteMagic-refresh jp-mod-styled', 'Refresh');
    refresh.onclick = () => void this.refresh(true);
    header.appendChild(refresh);
    this.node.appendChild(header);
    this.status = element('div', 'jp-RemoteMagic-status');
    this.node.appendChild(this.status);
    this.list = element('div', 'jp-RemoteMagic-list');
    this.node.appendChild(this.list);
    this.footer = element('div', 'jp-RemoteMagic-footer');
    this.node.appendChild(this.footer);
    this.cleared = JobsPanel.loadCleared();
  }

  get running(): number {
    return this.jobs.filter(job => RUNNING.has(job.state)).length;
  }

  /** Running and queued jobs, counted apart (a queued job is not running yet). */
  get counts(): { running: number; queued: number } {
    const queued = this.jobs.filter(job => QUEUED.has(job.state)).length;
    return { running: this.running - queued, queued };
  }

  /** A cell that may submit a job started (``true``) or ended here: poll fast while one runs. */
  watch(cellId: string, running: boolean): void {
    if (running) {
      this.watched.set(cellId, Date.now());
      void this.refresh();
    } else {
      this.watched.delete(cellId);
    }
  }

  /** Ask the server now (``fresh``: bypass its short cache); poll fast while something runs, slowly otherwise. */
  async refresh(fresh = false): Promise<void> {
    if (this.timer !== null) {
      window.clearTimeout(this.timer);
      this.timer = null;
    }
    const active = this.running > 0;
    // While nothing runs, the hosts are asked only once the registry changed (a kernel submitted a job).
    const query = fresh ? '?fresh=1' : !active && this.registry ? `?unless=${encodeURIComponent(this.registry)}` : '';
    const askGpus = () => requestAPI<{ hosts: IHostGpus[] }>('gpus', {}, fresh ? '?fresh=1' : '').catch(() => null);
    let gpus = active || fresh ? askGpus() : null;
    let changed = true;
    try {
      const reply = await requestAPI<{ jobs?: IJob[]; unchanged?: boolean; registry?: string }>('jobs', {}, query);
      this.registry = reply.registry ?? null;
      changed = !reply.unchanged;
      if (reply.jobs) {
        this.jobs = reply.jobs;
        this.forgetVanished();
      }
      this.status.textContent = '';
    } catch (error) {
      this.status.textContent = `Could not list jobs: ${error}`;
    }
    if (changed) {
      gpus = gpus || askGpus();
      const hosts = await gpus; // a server without the GPUs API, or a failed call: no GPU lines
      this.gpus = new Map((hosts?.hosts || []).map(host => [host.host, host]));
      await this.updateLogs();
      this.render();
    }
    const { running, queued } = this.counts;
    this.onChange(running, queued);
    for (const [cellId, started] of this.watched) {
      if (Date.now() - started > WATCH_LIMIT_MS) {
        this.watched.delete(cellId);
      }
    }
    if (this.timer === null) {  // a refresh that overlapped this one already scheduled the next
      const wait = this.running > 0 ? POLL_MS : this.watched.size > 0 ? WATCH_MS : IDLE_MS;
      this.timer = window.setTimeout(() => void this.refresh(), wait);
    }
  }

  private static loadCleared(): Set<string> {
    try {
      const saved = JSON.parse(window.localStorage.getItem(CLEARED_KEY) || '[]');
      return new Set(Array.isArray(saved) ? saved.filter(key => typeof key === 'string') : []);
    } catch {
      return new Set();
    }
  }

  private saveCleared(): void {
    try {
      window.localStorage.setItem(CLEARED_KEY, JSON.stringify([...this.cleared]));
    } catch {
      // storage full or disabled: cleared for this page only
    }
  }

  /** Cleared ids of jobs no longer in the registry (collected, removed) need not be kept. */
  private forgetVanished(): void {
    const known = new Set(this.jobs.map(jobKey));
    const kept = [...this.cleared].filter(key => known.has(key));
    if (kept.length !== this.cleared.size) {
      this.cleared = new Set(kept);
      this.saveCleared();
    }
  }

  /** One entry per job, and one per sweep holding all its trials; newest first. */
  private entries(jobs: IJob[]): IEntry[] {
    const entries: IEntry[] = [];
    const sweeps = new Map<string, IEntry>();
    for (const job of [...jobs].reverse()) {
      const sweep = job.sweep && job.sweep.id ? job.sweep : null;
      if (!sweep) {
        entries.push({ key: jobKey(job), sweep: null, jobs: [job] });
        continue;
      }
      const key = `${job.host}/${sweep.id}`;
      let entry = sweeps.get(key);
      if (!entry) {
        entry = { key, sweep, jobs: [] };
        sweeps.set(key, entry);
        entries.push(entry);
      }
      entry.jobs.push(job);
    }
    for (const entry of sweeps.values()) {
      entry.jobs.sort((a, b) => (a.sweep?.trial ?? 0) - (b.sweep?.trial ?? 0));
    }
    return entries;
  }

  /** Re-render, keeping the keyboard focus on the same row or button (the list is rebuilt on every poll). */
  private render(): void {
    const active = document.activeElement as HTMLElement | null;
    const focusKey = active && this.node.contains(active) ? active.dataset.focusKey : undefined;
    const scrolled = this.node.scrollTop;
    if (focusKey) {
      // Hold the focus on the panel while its old button goes: a focused node removed from the page makes
      // JupyterLab hand the focus to the main area.
      this.node.focus({ preventScroll: true });
    }
    this.renderList();
    this.node.scrollTop = scrolled;
    if (focusKey) {
      this.node.querySelector<HTMLElement>(`[data-focus-key="${CSS.escape(focusKey)}"]`)?.focus({ preventScroll: true });
    }
  }

  private renderList(): void {
    this.list.textContent = '';
    this.footer.textContent = '';
    if (this.jobs.length === 0) {
      this.list.appendChild(
        element('p', 'jp-RemoteMagic-empty', 'No jobs yet. Run a %%remote_train cell.')
      );
      return;
    }
    const hosts = [...new Set(this.jobs.map(job => job.host))];
    for (const host of hosts) {
      const gpus = this.gpus.get(host)?.gpus || [];
      const visible = this.jobs.filter(job => job.host === host && !this.cleared.has(jobKey(job)));
      if (visible.length === 0 && gpus.length === 0) {
        continue; // every job of it cleared: nothing to show
      }
      const group = element('section', 'jp-RemoteMagic-host');
      group.dataset.host = host;
      group.appendChild(element('h3', 'jp-RemoteMagic-hostname', host));
      if (gpus.length > 0) {
        group.appendChild(this.renderGpus(host, gpus));
      }
      const entries = this.entries(visible);
      const finished = entries.filter(entry => entry.jobs.every(isFinished));
      for (const entry of entries.filter(entry => !finished.includes(entry))) {
        group.appendChild(this.renderEntry(entry));
      }
      if (finished.length > 0) {
        group.appendChild(this.renderFinished(host, finished));
      }
      this.list.appendChild(group);
    }
    if (this.cleared.size > 0) {
      const count = this.cleared.size;
      this.footer.appendChild(
        element('span', 'jp-RemoteMagic-clearedcount', `${count} cleared job${count === 1 ? '' : 's'} hidden`)
      );
      const restore = element('button', 'jp-RemoteMagic-restore jp-mod-styled', 'Show again');
      restore.title = 'List the cleared jobs again';
      restore.dataset.focusKey = 'restore';
      restore.onclick = () => {
        this.cleared.clear();
        this.saveCleared();
        this.render();
      };
      this.footer.appendChild(restore);
    }
  }

  /** One line per GPU: index, utilization, memory used/total, and who holds it (a job's title, or free). */
  private renderGpus(host: string, gpus: IGpu[]): HTMLElement {
    const box = element('div', 'jp-RemoteMagic-gpus');
    const models = [...new Set(gpus.map(gpu => gpu.name))];
    const head = models.length === 1 ? `${gpus.length} × ${models[0]}` : `${gpus.length} GPUs`;
    box.appendChild(element('div', 'jp-RemoteMagic-gpuhead', head)).title = models.join(', ');
    for (const gpu of gpus) {
      const line = element('div', 'jp-RemoteMagic-gpu');
      line.dataset.gpu = String(gpu.index);
      line.appendChild(element('span', 'jp-RemoteMagic-gpuindex', String(gpu.index)));
      const usage = element('span', 'jp-RemoteMagic-gpuutil');
      const bar = element('span', 'jp-RemoteMagic-gpubar');
      const fill = element('span', 'jp-RemoteMagic-gpufill');
      const percent = typeof gpu.utilization === 'number' ? gpu.utilization : 0;
      fill.style.width = `${Math.max(0, Math.min(100, percent))}%`;
      bar.appendChild(fill);
      usage.appendChild(bar);
      usage.appendChild(
        element('span', '', typeof gpu.utilization === 'number' ? `${gpu.utilization}%` : String(gpu.utilization))
      );
      line.appendChild(usage);
      line.appendChild(
        element('span', 'jp-RemoteMagic-gpumem', `${formatGiB(gpu.memory_used)}/${formatGiB(gpu.memory_total)} GiB`)
      );
      const holder = this.holderOf(host, gpu);
      const who = element('span', `jp-RemoteMagic-gpuholder${holder ? '' : ' jp-RemoteMagic-free'}`, holder || 'free');
      who.title = gpu.job_id ? `${holder} (job ${gpu.job_id})` : holder || 'free';
      line.appendChild(who);
      box.appendChild(line);
    }
    return box;
  }

  private holderOf(host: string, gpu: IGpu): string | null {
    const job = gpu.job_id ? this.jobs.find(job => job.host === host && job.job_id === gpu.job_id) : undefined;
    if (job) {
      return job.sweep ? `${jobTitle(job)} ${trialLabel(job.sweep)}` : jobTitle(job);
    }
    return gpu.holder || null;
  }

  private renderEntry(entry: IEntry): HTMLElement {
    return entry.sweep ? this.renderSweep(entry.sweep, entry.key, entry.jobs) : this.renderJob(entry.jobs[0]);
  }

  /** "N finished", folded; Clear finished hides them in this browser (the hosts keep them). */
  private renderFinished(host: string, finished: IEntry[]): HTMLElement {
    const fold = element('details', 'jp-RemoteMagic-finished');
    const summary = element('summary', 'jp-RemoteMagic-finishedsummary');
    foldable(fold, summary, this.openFinished, host);
    summary.appendChild(element('span', 'jp-RemoteMagic-finishedcount', `${finished.length} finished`));
    const clear = element('button', 'jp-RemoteMagic-clear jp-mod-styled', 'Clear finished');
    clear.dataset.focusKey = `clear:${host}`;
    clear.title = 'Hide these jobs from this list (nothing is deleted on the host)';
    clear.onclick = event => {
      event.preventDefault(); // not a toggle of the fold
      event.stopPropagation();
      for (const entry of finished) {
        entry.jobs.forEach(job => this.cleared.add(jobKey(job)));
      }
      this.saveCleared();
      this.render();
    };
    summary.appendChild(clear);
    fold.appendChild(summary);
    for (const entry of finished) {
      fold.appendChild(this.renderEntry(entry));
    }
    return fold;
  }

  /** A sweep as one entry: its counts and best trial on top, its trials inside (best first). */
  private renderSweep(sweep: ISweep, key: string, trials: IJob[]): HTMLElement {
    const state = sweepState(trials);
    const box = element('details', 'jp-RemoteMagic-sweep');
    box.dataset.sweepId = sweep.id;
    box.dataset.state = state;
    const summary = element('summary', `jp-RemoteMagic-sweepsummary jp-RemoteMagic-state-${state}`);
    foldable(box, summary, this.openSweeps, key);
    const title = element('div', 'jp-RemoteMagic-jobtitle');
    title.appendChild(stateIcon(state));
    // Its name, else the cell's first statement (every trial runs the same cell).
    const text = sweep.name || trials[0].title || sweep.id;
    const name = element('span', 'jp-RemoteMagic-name', text);
    name.title = `${text}\nsweep ${sweep.id}`;
    title.appendChild(name);
    const count = `${trials.length} trial${trials.length === 1 ? '' : 's'}`;
    title.appendChild(element('span', 'jp-RemoteMagic-state', count));
    summary.appendChild(title);
    summary.appendChild(element('div', 'jp-RemoteMagic-details jp-RemoteMagic-sweepid', sweep.id));
    summary.appendChild(element('div', 'jp-RemoteMagic-details jp-RemoteMagic-sweepcounts', stateCounts(trials)));
    const ranking = sweepMetric(sweep, trials);
    let ranked = trials;
    let best = '';
    if (ranking) {
      const sign = ranking.mode === 'max' ? -1 : 1;
      const value = (job: IJob) => {
        const metric = (job.logs || {})[ranking.metric];
        return typeof metric === 'number' && isFinite(metric) ? sign * metric : Infinity;
      };
      ranked = [...trials].sort((a, b) => value(a) - value(b));
      const first = ranked[0];
      if (value(first) !== Infinity && first.sweep) {
        const metric = formatMetric((first.logs || {})[ranking.metric]);
        best = `best ${ranking.metric} ${metric} (${trialLabel(first.sweep)})`;
      }
    }
    if (best) {
      const line = element('div', 'jp-RemoteMagic-details jp-RemoteMagic-sweepbest', best);
      line.title = best;
      summary.appendChild(line);
    }
    box.appendChild(summary);

    const body = element('div', 'jp-RemoteMagic-trials');
    for (const job of ranked) {
      body.appendChild(this.renderJob(job, ranking?.metric));
    }
    const running = trials.filter(job => RUNNING.has(job.state));
    if (running.length > 0) {
      const actions = element('div', 'jp-RemoteMagic-actions');
      const cancel = element('button', 'jp-RemoteMagic-cancelsweep jp-mod-styled', 'Cancel sweep');
      cancel.dataset.focusKey = `cancelsweep:${key}`;
      cancel.onclick = () => void this.cancelSweep(sweep, running);
      actions.appendChild(cancel);
      body.appendChild(actions);
    }
    box.appendChild(body);
    return box;
  }

  /** A job's row; ``metric``: the one its sweep ranks trials by, shown first. */
  private renderJob(job: IJob, metric?: string): HTMLElement {
    const key = jobKey(job);
    const ended = isFinished(job) ? ' jp-RemoteMagic-ended' : '';
    const row = element('div', `jp-RemoteMagic-job jp-RemoteMagic-state-${job.state}${ended}`);
    row.dataset.jobId = job.job_id;
    row.dataset.state = job.state;
    // Reachable by keyboard as a Running panel row: Tab to it, Enter or Space shows its log.
    row.tabIndex = 0;
    row.dataset.focusKey = `row:${key}`;
    const text = job.sweep ? trialLabel(job.sweep) : jobTitle(job);
    row.setAttribute('aria-label', `${text}, ${job.state}`);
    onActivate(row, () => void this.toggleLog(job, row));
    // The text on the left, the actions in a column of their own at the right: they never cover the metrics.
    const main = element('div', 'jp-RemoteMagic-main');
    row.appendChild(main);
    const title = element('div', 'jp-RemoteMagic-jobtitle');
    title.appendChild(stateIcon(job.state));
    const name = element('span', 'jp-RemoteMagic-name', text);
    name.title = `${job.sweep ? `${text}: ${jobTitle(job)}` : text}\njob ${job.job_id} on ${job.host}`;
    title.appendChild(name);
    title.appendChild(element('span', 'jp-RemoteMagic-state', job.state));
    main.appendChild(title);

    if (job.epochs && !isFinished(job)) {
      const bar = element('progress', 'jp-RemoteMagic-progress');
      bar.max = job.epochs;
      bar.value = job.epoch || 0;
      main.appendChild(bar);
    }
    const details: string[] = [];
    const logs = job.logs || {};
    // A trial shows first the metric its sweep ranks by; then every job its epoch and losses.
    const shown = [...new Set([...(metric ? [metric] : []), 'epoch', 'loss', 'val_loss'])];
    for (const key of shown) {
      if (key === 'epoch') {
        if (job.epoch) {
          details.push(`epoch ${job.epoch}/${job.epochs || '?'}`);
        }
      } else if (typeof logs[key] === 'number') {
        details.push(`${key} ${formatMetric(logs[key])}`);
      }
    }
    if (job.started) {
      const end = job.ended || Date.now() / 1000;
      details.push(formatSeconds(end - job.started));
    }
    if (details.length > 0) {
      const line = element('div', 'jp-RemoteMagic-details', details.join(' · '));
      line.title = line.textContent || '';
      main.appendChild(line);
    }
    const waiting = (job.state === 'queued' || job.state === 'requeued') && job.reason;
    const message = waiting ? this.queuedMessage(job) : job.message;
    if (message && !['done', 'stopped'].includes(job.state)) {
      const line = element('div', 'jp-RemoteMagic-message', message);
      line.title = message;
      main.appendChild(line);
    }
    row.appendChild(this.renderActions(job, row));
    const open = this.logs.get(key);
    if (open) {
      row.appendChild(this.logView(open.text));
    }
    return row;
  }

  /** Copy attach, Show log and Cancel (running jobs) as icon buttons; "Copied" shows beside them for a moment. */
  private renderActions(job: IJob, row: HTMLElement): HTMLElement {
    const key = jobKey(job);
    const actions = element('div', 'jp-RemoteMagic-actions');
    const buttons = element('div', 'jp-RemoteMagic-buttons');
    actions.appendChild(buttons);
    const command = `%remote_attach ${job.job_id} --host ${job.host}`;
    const copied = (this.copied.get(key) || 0) > Date.now();
    const copy = iconButton(
      copied ? checkIcon : copyIcon,
      'jp-RemoteMagic-copy',
      `Copy attach: ${command}`,
      `copy:${key}`
    );
    copy.onclick = () => {
      Clipboard.copyToSystem(command);
      this.copied.set(key, Date.now() + COPIED_MS);
      this.render();
      window.setTimeout(() => {
        this.copied.delete(key);
        this.render();
      }, COPIED_MS);
    };
    buttons.appendChild(copy);
    const open = this.logs.has(key);
    const log = iconButton(listIcon, 'jp-RemoteMagic-showlog', open ? 'Hide log' : 'Show log', `log:${key}`);
    log.setAttribute('aria-pressed', String(open));
    log.onclick = () => void this.toggleLog(job, row);
    buttons.appendChild(log);
    if (RUNNING.has(job.state)) {
      const cancel = iconButton(closeIcon, 'jp-RemoteMagic-cancel', 'Cancel the job…', `cancel:${key}`);
      cancel.onclick = () => void this.cancel(job);
      buttons.appendChild(cancel);
    }
    if (copied) {  // before the buttons, on their line: nothing below moves
      const note = element('span', 'jp-RemoteMagic-copied', 'Copied');
      note.setAttribute('role', 'status');
      actions.insertBefore(note, buttons);
    }
    return actions;
  }

  private queuedMessage(job: IJob): string {
    return job.position ? `#${job.position} in the queue: ${job.reason}` : `${job.reason}`;
  }

  private async cancel(job: IJob): Promise<void> {
    const answer = await showDialog({
      title: 'Cancel remote job?',
      body:
        `Job ${jobTitle(job)} (${job.job_id}) on ${job.host} will be ended now; ` +
        'nothing it produced so far is returned.',
      buttons: [Dialog.cancelButton({ label: 'Keep running' }), Dialog.warnButton({ label: 'Cancel job' })]
    });
    if (!answer.button.accept) {
      return;
    }
    try {
      await requestAPI(`jobs/${encodeURIComponent(job.host)}/${job.job_id}/cancel`, { method: 'POST' });
    } catch (error) {
      this.status.textContent = `Could not cancel ${job.job_id}: ${error}`;
    }
    await this.refresh();
  }

  private async cancelSweep(sweep: ISweep, running: IJob[]): Promise<void> {
    const answer = await showDialog({
      title: 'Cancel the sweep?',
      body:
        `The ${running.length} trial${running.length === 1 ? '' : 's'} of ${sweep.name || sweep.id} ` +
        'still running or queued will be ended now; finished trials keep their outputs.',
      buttons: [Dialog.cancelButton({ label: 'Keep running' }), Dialog.warnButton({ label: 'Cancel sweep' })]
    });
    if (!answer.button.accept) {
      return;
    }
    for (const job of running) {
      try {
        await requestAPI(`jobs/${encodeURIComponent(job.host)}/${job.job_id}/cancel`, { method: 'POST' });
      } catch (error) {
        this.status.textContent = `Could not cancel ${job.job_id}: ${error}`;
      }
    }
    await this.refresh();
  }

  private logView(lines: string[]): HTMLPreElement {
    const pre = element('pre', 'jp-RemoteMagic-log', lines.slice(-30).join('') || '(no output)');
    window.requestAnimationFrame(() => (pre.scrollTop = pre.scrollHeight));
    return pre;
  }

  /** Output lines from ``next`` on, added to what the open log already shows. */
  private async readLog(job: IJob, log: { text: string[]; next: number }): Promise<void> {
    const reply = await requestAPI<{ events: IEvent[] }>(
      `jobs/${encodeURIComponent(job.host)}/${job.job_id}/events`,
      {},
      `?from=${log.next}`
    );
    for (const event of reply.events) {
      if (event.type === 'stdout' || event.type === 'stderr') {
        log.text.push(event.text || '');
      }
      log.next = Math.max(log.next, event.seq + 1);
    }
    log.text.splice(0, Math.max(0, log.text.length - 200));
  }

  /** Open logs of running jobs follow them: each refresh reads only the new events. */
  private async updateLogs(): Promise<void> {
    for (const job of this.jobs) {
      const log = this.logs.get(jobKey(job));
      if (log && RUNNING.has(job.state)) {
        await this.readLog(job, log).catch(() => undefined);
      }
    }
  }

  private async toggleLog(job: IJob, row: HTMLElement): Promise<void> {
    const key = jobKey(job);
    const existing = row.querySelector('.jp-RemoteMagic-log');
    if (existing) {
      existing.remove();
      this.logs.delete(key);
      this.render();
      return;
    }
    const log = { text: [] as string[], next: 0 };
    const pre = element('pre', 'jp-RemoteMagic-log', 'loading…');
    row.appendChild(pre);
    try {
      await this.readLog(job, log);
      this.logs.set(key, log);
      pre.replaceWith(this.logView(log.text));
      this.render();
    } catch (error) {
      pre.textContent = `Could not read the log: ${error}`;
    }
  }
}

/**
 * "N remote jobs running, M queued" in the status bar, drawn as JupyterLab's own text items (same line,
 * same hover); hidden at zero; a click, or Enter or Space, opens the sidebar.
 */
class RunningItem extends Widget {
  private text: HTMLSpanElement;

  constructor(onClick: () => void) {
    super();
    this.addClass('jp-RemoteMagic-statusitem');
    this.addClass('jp-mod-highlighted');
    this.text = element('span', 'jp-StatusBar-TextItem');
    this.node.appendChild(this.text);
    this.node.tabIndex = 0;
    this.node.setAttribute('role', 'button');
    this.node.onclick = onClick;
    onActivate(this.node, onClick);
    this.setCounts(0, 0);
  }

  setCounts(running: number, queued: number): void {
    const jobs = (count: number) => `remote job${count === 1 ? '' : 's'}`;
    this.text.textContent =
      running > 0
        ? `${running} ${jobs(running)} running${queued > 0 ? `, ${queued} queued` : ''}`
        : `${queued} ${jobs(queued)} queued`;
    const parts = [...(running > 0 ? [`${running} running`] : []), ...(queued > 0 ? [`${queued} queued`] : [])];
    this.node.title = `${parts.join(', ')} ${jobs(running + queued)}; click to open the sidebar`;
    this.node.style.display = running + queued > 0 ? '' : 'none';
  }
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description: 'Remote training jobs: sidebar and status bar item.',
  autoStart: true,
  requires: [ILabShell],
  optional: [IStatusBar],
  activate: (app: JupyterFrontEnd, shell: ILabShell, statusBar: IStatusBar | null) => {
    const panel = new JobsPanel();
    shell.add(panel, 'left', { rank: 900 });
    let item: RunningItem | null = null;
    if (statusBar) {
      item = new RunningItem(() => shell.activateById(PANEL_ID));
      statusBar.registerStatusItem('remote-magic:running', { item, align: 'left', rank: 50 });
    }
    panel.onChange = (running, queued) => item?.setCounts(running, queued);
    // A cell that may start or attach a job: poll fast while it runs, so that a blocking cell's job shows as soon
    // as its kernel records it (the cell's end alone came too late), and ask again when it ends.
    const mayStartJob = (cell: { model: { id: string; sharedModel: { getSource(): string } } }) =>
      cell.model.sharedModel.getSource().includes('remote_');
    NotebookActions.executionScheduled.connect((_, args) => {
      if (mayStartJob(args.cell)) {
        panel.watch(args.cell.model.id, true);
      }
    });
    NotebookActions.executed.connect((_, args) => {
      if (mayStartJob(args.cell)) {
        panel.watch(args.cell.model.id, false);
        void panel.refresh(true);
      }
    });
    void panel.refresh();
  }
};

export default [plugin, widgetFallbackPlugin];
