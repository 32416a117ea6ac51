/**
 * remote_magic for JupyterLab: a "Remote training" sidebar listing every job
 * this machine submitted (grouped by host) and a status bar item counting the
 * running ones. Data comes from the server extension's REST API
 * (/remote-magic/api), which talks to the hosts through the same session
 * layer as the magics.
 */
import {
  ILabShell,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { Dialog, showDialog } from '@jupyterlab/apputils';
import { URLExt } from '@jupyterlab/coreutils';
import { NotebookActions } from '@jupyterlab/notebook';
import { ServerConnection } from '@jupyterlab/services';
import { IStatusBar } from '@jupyterlab/statusbar';
import { LabIcon } from '@jupyterlab/ui-components';
import { Widget } from '@lumino/widgets';

const PLUGIN_ID = 'remote-magic-labextension:plugin';
const PANEL_ID = 'remote-magic-jobs';
const POLL_MS = 3000;
const RUNNING = new Set(['queued', 'running']);

interface IJob {
  host: string;
  job_id: string;
  name?: string | null;
  state: string;
  epoch?: number | null;
  epochs?: number | null;
  logs?: Record<string, number>;
  started?: number | null;
  ended?: number | null;
  submitted?: number | null;
  message?: string | null;
}

interface IEvent {
  seq: number;
  type: string;
  text?: string;
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

const STATE_ICONS: Record<string, string> = {
  queued: '⏳',
  running: '▶',
  done: '✔',
  stopped: '⏹',
  error: '✖',
  cancelled: '⊘',
  killed: '☠',
  unreachable: '⚠',
  gone: '∅'
};

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

/** The sidebar: jobs grouped by host, refreshed while any of them runs. */
class JobsPanel extends Widget {
  jobs: IJob[] = [];
  onChange: (running: number) => void = () => undefined;
  private timer: number | null = null;
  private list: HTMLDivElement;
  private status: HTMLDivElement;

  constructor() {
    super();
    this.id = PANEL_ID;
    this.addClass('jp-RemoteMagic-panel');
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
  }

  get running(): number {
    return this.jobs.filter(job => RUNNING.has(job.state)).length;
  }

  /** Ask the server now (``fresh``: bypass its short cache); keep polling only while something runs. */
  async refresh(fresh = false): Promise<void> {
    if (this.timer !== null) {
      window.clearTimeout(this.timer);
      this.timer = null;
    }
    try {
      const reply = await requestAPI<{ jobs: IJob[] }>('jobs', {}, fresh ? '?fresh=1' : '');
      this.jobs = reply.jobs;
      this.status.textContent = '';
    } catch (error) {
      this.status.textContent = `Could not list jobs: ${error}`;
    }
    this.render();
    this.onChange(this.running);
    if (this.running > 0) {
      this.timer = window.setTimeout(() => void this.refresh(), POLL_MS);
    }
  }

  private render(): void {
    this.list.textContent = '';
    if (this.jobs.length === 0) {
      this.list.appendChild(
        element('p', 'jp-RemoteMagic-empty', 'No jobs yet. Run a %%remote_train cell.')
      );
      return;
    }
    const hosts = [...new Set(this.jobs.map(job => job.host))];
    for (const host of hosts) {
      const group = element('section', 'jp-RemoteMagic-host');
      group.dataset.host = host;
      group.appendChild(element('h3', 'jp-RemoteMagic-hostname', host));
      const jobs = this.jobs.filter(job => job.host === host).reverse();
      for (const job of jobs) {
        group.appendChild(this.renderJob(job));
      }
      this.list.appendChild(group);
    }
  }

  private renderJob(job: IJob): HTMLElement {
    const row = element('div', `jp-RemoteMagic-job jp-RemoteMagic-state-${job.state}`);
    row.dataset.jobId = job.job_id;
    row.dataset.state = job.state;
    const title = element('div', 'jp-RemoteMagic-jobtitle');
    title.appendChild(element('span', 'jp-RemoteMagic-name', job.name || job.job_id));
    const state = element('span', 'jp-RemoteMagic-state', `${STATE_ICONS[job.state] || '?'} ${job.state}`);
    title.appendChild(state);
    row.appendChild(title);

    if (job.epochs) {
      const bar = element('progress', 'jp-RemoteMagic-progress');
      bar.max = job.epochs;
      bar.value = job.epoch || 0;
      row.appendChild(bar);
    }
    const details: string[] = [];
    if (job.epoch) {
      details.push(`epoch ${job.epoch}/${job.epochs || '?'}`);
    }
    const logs = job.logs || {};
    if (logs.loss !== undefined) {
      details.push(`loss ${logs.loss.toFixed(4)}`);
    }
    if (logs.val_loss !== undefined) {
      details.push(`val_loss ${logs.val_loss.toFixed(4)}`);
    }
    if (job.started) {
      const end = job.ended || Date.now() / 1000;
      details.push(formatSeconds(end - job.started));
    }
    row.appendChild(element('div', 'jp-RemoteMagic-details', details.join(' · ')));
    if (job.message && !['done', 'stopped'].includes(job.state)) {
      row.appendChild(element('div', 'jp-RemoteMagic-message', job.message));
    }

    const actions = element('div', 'jp-RemoteMagic-actions');
    if (RUNNING.has(job.state)) {
      const cancel = element('button', 'jp-RemoteMagic-cancel jp-mod-styled', 'Cancel');
      cancel.onclick = () => void this.cancel(job);
      actions.appendChild(cancel);
    }
    const copy = element('button', 'jp-RemoteMagic-copy jp-mod-styled', 'Copy attach');
    copy.title = `%remote_attach ${job.job_id} --host ${job.host}`;
    copy.onclick = () => void navigator.clipboard?.writeText(copy.title);
    actions.appendChild(copy);
    const log = element('button', 'jp-RemoteMagic-showlog jp-mod-styled', 'Show log');
    log.onclick = () => void this.showLog(job, row);
    actions.appendChild(log);
    row.appendChild(actions);
    return row;
  }

  private async cancel(job: IJob): Promise<void> {
    const answer = await showDialog({
      title: 'Cancel remote job?',
      body: `Job ${job.name || job.job_id} on ${job.host} will be ended now; nothing it produced so far is returned.`,
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

  private async showLog(job: IJob, row: HTMLElement): Promise<void> {
    const existing = row.querySelector('.jp-RemoteMagic-log');
    if (existing) {
      existing.remove();
      return;
    }
    const pre = element('pre', 'jp-RemoteMagic-log', 'loading…');
    row.appendChild(pre);
    try {
      const reply = await requestAPI<{ events: IEvent[] }>(
        `jobs/${encodeURIComponent(job.host)}/${job.job_id}/events`
      );
      const lines = reply.events
        .filter(event => event.type === 'stdout' || event.type === 'stderr')
        .map(event => event.text || '');
      pre.textContent = lines.slice(-30).join('') || '(no output)';
    } catch (error) {
      pre.textContent = `Could not read the log: ${error}`;
    }
  }
}

/** "N remote jobs running" in the status bar; hidden at zero; a click opens the sidebar. */
class RunningItem extends Widget {
  constructor(onClick: () => void) {
    super();
    this.addClass('jp-RemoteMagic-statusitem');
    this.node.onclick = onClick;
    this.setRunning(0);
  }

  setRunning(running: number): void {
    this.node.textContent = `${running} remote job${running === 1 ? '' : 's'} running`;
    this.node.style.display = running > 0 ? '' : 'none';
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
    panel.onChange = running => item?.setRunning(running);
    // A cell that starts or attaches a job makes the list worth asking for again.
    NotebookActions.executed.connect((_, args) => {
      if (args.cell.model.sharedModel.getSource().includes('remote_')) {
        void panel.refresh(true);
      }
    });
    void panel.refresh();
  }
};

export default plugin;
