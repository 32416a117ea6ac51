/**
 * A widget output whose model is gone shows the output's own HTML copy instead of ipywidgets'
 * "Error displaying widget: model not found".
 *
 * A blocking `%%remote_train` cell whose kernel restarts (or dies) while it runs leaves its live widget in the
 * notebook; the model lived in that kernel, so the reopened notebook cannot draw it. The kernel keeps a
 * `text/html` copy of the panel in the same output (updated by display id), and that copy is what is shown
 * here whenever the widget cannot be: no widget manager (no kernel), a model the manager does not know, or a
 * kernel that restarted since the view was drawn.
 *
 * ipywidgets 8 registers its renderer for the widget-view mimetype on each notebook's rendermime (a copy of
 * a placeholder at first, its real one once the kernel is ready, removing what was there); a rendermime keeps
 * one factory per mimetype. So each notebook's rendermime wraps whatever widget factory is registered on it,
 * now and later: the wrapper holds ipywidgets' own renderer, untouched, and the copy beside it, and shows one.
 * Whether the widget failed is read from that renderer as ipywidgets leaves it (no child view, the
 * `jupyter-widgets` class it adds with its error text), so no private API is used.
 */
import { JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { NotebookPanel } from '@jupyterlab/notebook';
import { IRenderMimeRegistry } from '@jupyterlab/rendermime';
import { IRenderMime } from '@jupyterlab/rendermime-interfaces';
import { Panel } from '@lumino/widgets';

const WIDGET_MIME = 'application/vnd.jupyter.widget-view+json';
// How long a widget may say "Loading widget..." before the copy stands in (a live one appears within ms; one
// whose kernel is busy or gone may never).
const LOADING_GRACE_MS = 500;
const SHOW_COPY = 'jp-RemoteMagic-showCopy';

/** One notebook's widget renderers: the factory ipywidgets registered for its kernel, and kernel restarts. */
class NotebookWidgets {
  // ipywidgets' renderer factory with a widget manager; null while there is only its placeholder (no kernel yet).
  factory: IRenderMime.IRendererFactory | null = null;
  // Counts the kernels that went away: a view drawn under an older one shows a model that no longer exists.
  generation = 0;
  readonly renderers = new Set<WidgetOrCopy>();

  constructor(readonly rendermime: IRenderMimeRegistry) {}

  /** The factory the notebook's rendermime gets in place of ``factory`` (null: a placeholder, wait). */
  wrap(factory: IRenderMime.IRendererFactory, real: boolean): IRenderMime.IRendererFactory {
    if (real) {
      this.factory = factory;
      this.renderers.forEach(renderer => void renderer.retry());
    }
    return {
      safe: factory.safe,
      mimeTypes: [WIDGET_MIME],
      defaultRank: factory.defaultRank,
      createRenderer: options => new WidgetOrCopy(options, this)
    };
  }

  kernelGone(): void {
    this.generation++;
    this.renderers.forEach(renderer => renderer.update());
  }
}

/** ipywidgets' renderer for one output and, when it cannot show the widget, the output's HTML copy. */
class WidgetOrCopy extends Panel implements IRenderMime.IRenderer {
  private inner: IRenderMime.IRenderer | null = null;
  private innerFactory: IRenderMime.IRendererFactory | null = null;
  private copy: IRenderMime.IRenderer | null = null;
  private copyType = '';
  private model: IRenderMime.IMimeModel | null = null;
  private copyModel: IRenderMime.IMimeModel | null = null;
  private modelId: string | null = null;
  private generation = 0;
  private loadingSince = 0;
  private timer: number | null = null;
  // ipywidgets' renderer changes its node when a view arrives or fails, also long after renderModel returned
  // (a manager restored later re-renders it): watched, not polled.
  private observer = new MutationObserver(() => this.update());

  constructor(
    private options: IRenderMime.IRendererOptions,
    private notebook: NotebookWidgets
  ) {
    super();
    this.addClass('jp-RemoteMagic-widgetOrCopy');
    notebook.renderers.add(this);
  }

  async renderModel(model: IRenderMime.IMimeModel): Promise<void> {
    this.model = model;
    await this.retry();
  }

  /** Draw the widget with the notebook's current widget factory (a copy until there is one). */
  async retry(): Promise<void> {
    const model = this.model;
    const factory = this.notebook.factory;
    if (!model || !factory || this.isDisposed) {
      this.update();
      return;
    }
    const id = String((model.data[WIDGET_MIME] as { model_id?: string } | undefined)?.model_id ?? '');
    const same = id === this.modelId && this.generation === this.notebook.generation;
    if (same && this.innerFactory === factory && this.state() === 'widget') {
      // An update by display id of a widget already shown: its view follows the model; only the copy is new.
      this.update();
      return;
    }
    if (!this.inner || this.innerFactory !== factory) {
      this.inner?.dispose();
      this.inner = factory.createRenderer(this.options);
      this.innerFactory = factory;
      this.inner.addClass('jp-RemoteMagic-widget');
      this.insertWidget(0, this.inner);
      this.observer.disconnect();
      this.observer.observe(this.inner.node, { childList: true, attributes: true, attributeFilter: ['class'] });
    }
    this.modelId = id;
    this.generation = this.notebook.generation;
    this.loadingSince = Date.now();
    try {
      await this.inner.renderModel(model);
    } catch (error) {
      console.error(error);
    }
    this.update();
  }

  private state(): 'widget' | 'loading' | 'failed' {
    const inner = this.inner;
    if (!inner || this.generation !== this.notebook.generation) {
      return 'failed'; // no widget manager, or the view's kernel is gone
    }
    if (Array.from(inner.children()).length > 0) {
      return 'widget';
    }
    return inner.hasClass('jupyter-widgets') ? 'failed' : 'loading';
  }

  /** Show the widget, or the copy where the widget cannot be (or still loads after the grace). */
  update(): void {
    const model = this.model;
    if (!model || this.isDisposed) {
      return;
    }
    const html = typeof model.data['text/html'] === 'string';
    if (!html && this.inner) {
      this.removeClass(SHOW_COPY); // no copy worth more than ipywidgets' own messages
      return;
    }
    const state = this.state();
    const waited = Date.now() - this.loadingSince;
    const showCopy =
      state === 'failed' || (state === 'loading' && (this.hasClass(SHOW_COPY) || waited >= LOADING_GRACE_MS));
    if (state === 'loading' && !showCopy && this.timer === null) {
      this.timer = window.setTimeout(() => {
        this.timer = null;
        this.update();
      }, LOADING_GRACE_MS - waited);
    }
    this.toggleClass(SHOW_COPY, showCopy);
    if (showCopy && this.copyModel !== model) {
      // JupyterLab's own renderers: HTML sanitized unless the output is trusted, as any text/html output. Until
      // a widget manager exists (none without a kernel), another widget's text stands where "Loading widget..." would.
      const mimeType = html ? 'text/html' : 'text/plain';
      if (!this.copy || this.copyType !== mimeType) {
        this.copy?.dispose();
        this.copyType = mimeType;
        this.copy = this.notebook.rendermime.createRenderer(mimeType);
        this.copy.addClass('jp-RemoteMagic-widgetCopy');
        this.addWidget(this.copy);
      }
      this.copyModel = model;
      void this.copy.renderModel(model);
    }
  }

  dispose(): void {
    if (this.isDisposed) {
      return;
    }
    this.notebook.renderers.delete(this);
    this.observer.disconnect();
    if (this.timer !== null) {
      window.clearTimeout(this.timer);
    }
    super.dispose();
  }
}

/** Wrap the widget renderer of one notebook's rendermime, now and whenever ipywidgets registers it again. */
function standInForLostWidgets(panel: NotebookPanel, global: IRenderMimeRegistry): void {
  const rendermime = panel.content.rendermime;
  const current = rendermime.getFactory(WIDGET_MIME);
  if (!current) {
    return; // no ipywidgets: JupyterLab shows the text/html of such outputs anyway
  }
  const notebook = new NotebookWidgets(rendermime);
  const add = rendermime.addFactory.bind(rendermime);
  rendermime.addFactory = (factory: IRenderMime.IRendererFactory, rank?: number) => {
    const widgets = factory.mimeTypes.length === 1 && factory.mimeTypes[0] === WIDGET_MIME;
    add(widgets ? notebook.wrap(factory, true) : factory, rank);
  };
  // The notebook's copy of the app-wide factory is ipywidgets' placeholder, without a manager yet.
  add(notebook.wrap(current, current !== global.getFactory(WIDGET_MIME)), rendermime.getRank(WIDGET_MIME));
  panel.sessionContext.statusChanged.connect((_, status) => {
    if (status === 'restarting' || status === 'autorestarting' || status === 'dead') {
      notebook.kernelGone();
    }
  });
  panel.sessionContext.kernelChanged.connect((_, change) => {
    if (change.oldValue) {
      notebook.kernelGone();
    }
  });
}

export const widgetFallbackPlugin: JupyterFrontEndPlugin<void> = {
  id: 'remote-magic-labextension:widget-fallback',
  description: 'Widget outputs whose kernel is gone show their HTML copy instead of "model not found".',
  autoStart: true,
  requires: [IRenderMimeRegistry],
  activate: (app: JupyterFrontEnd, rendermime: IRenderMimeRegistry) => {
    // A widget extension runs as each notebook is created, before its outputs are drawn.
    app.docRegistry.addWidgetExtension('Notebook', {
      createNew: (panel: NotebookPanel) => {
        standInForLostWidgets(panel, rendermime);
      }
    });
  }
};
