/* The ganserve playground: a gallery of the models the server holds and, for the one chosen, the
   tools its kind offers (one <template> per tool in playground.html). It talks to the API only, by
   relative URLs, and shows every answer's latency with the server's Server-Timing split when the
   server sends one, or the API's error message. */
"use strict";

const $ = (selector, root = document) => root.querySelector(selector);
const $$ = (selector, root = document) => [...root.querySelectorAll(selector)];

function element(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

/* ---------- the API ---------- */

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
  toString() {
    return this.status ? `${this.status} ${this.code}: ${this.message}` : this.message;
  }
}

// "queue;dur=0.12, compute;dur=0.40, encode;dur=0.09, total;dur=1.1" → {queue: 0.12, compute: 0.4, …} (ms)
function parseServerTiming(header) {
  const stages = {};
  for (const metric of (header || "").split(",")) {
    const [name, ...params] = metric.split(";").map(part => part.trim());
    const duration = parseFloat((params.find(p => p.startsWith("dur=")) || "").slice(4));
    if (name && Number.isFinite(duration)) stages[name] = duration;
  }
  return stages;
}

// The API's own message ({"error": {"code", "message"}}; /v2's {"error": "message"}), else the status.
async function errorOf(response) {
  const text = await response.text();
  try {
    const error = JSON.parse(text).error;
    if (error && error.message) return new ApiError(response.status, error.code, error.message);
    if (typeof error === "string") return new ApiError(response.status, "error", error);
  } catch (_) { /* not JSON: fall through */ }
  return new ApiError(response.status, "http", text.slice(0, 300) || response.statusText || "an empty answer");
}

// One call: {body (a Blob, or JSON with as: "json"), latency (ms, measured here), stages (the server's, ms)}.
async function call(path, {json, body, as = "blob", method} = {}) {
  const options = json ? {method: "POST", headers: {"content-type": "application/json"}, body: JSON.stringify(json)}
                       : body ? {method: "POST", body} : method ? {method} : {};
  const started = performance.now();
  let response;
  try {
    response = await fetch(path, options);
  } catch (error) {
    throw new ApiError(0, "network", `the server could not be reached (${error.message})`);
  }
  if (!response.ok) throw await errorOf(response);
  const content = as === "json" ? await response.json() : await response.blob();
  return {body: content, latency: performance.now() - started, stages: parseServerTiming(response.headers.get("server-timing"))};
}

const STAGE_ORDER = ["queue", "compute", "encode", "total"];
const ms = value => `${value < 10 ? value.toFixed(1) : Math.round(value)} ms`;

function timingText({latency, stages = {}, note}) {
  const names = Object.keys(stages).sort((a, b) => rank(a) - rank(b));
  const split = names.map(name => `${name} ${ms(stages[name])}`).join(" · ");
  return `latency ${ms(latency)}` + (split ? ` — server: ${split}` : "") + (note ? ` (${note})` : "");
}
const rank = name => (STAGE_ORDER.includes(name) ? STAGE_ORDER.indexOf(name) : STAGE_ORDER.length);

/* ---------- showing results ---------- */

// A .result box: a message line (work in progress, or the error), the timing line, the output.
function resultBox(box) {
  const [message, timing, output] = [$(".message", box), $(".timing", box), $(".output", box)];
  const clear = () => {
    $$("img, a", output).forEach(node => (node.src || node.href || "").startsWith("blob:") && URL.revokeObjectURL(node.src || node.href));
    output.replaceChildren();
    timing.textContent = "";
  };
  return {
    working(text = "working…") { message.className = "message busy"; message.textContent = text; },
    fail(error) { clear(); message.className = "message error"; message.textContent = String(error); },
    done(answer, ...nodes) { clear(); message.className = "message"; message.textContent = ""; timing.textContent = timingText(answer); output.append(...nodes); },
  };
}

// Small images are shown enlarged by a whole factor (crisp pixels), at most 600 px wide.
const factorFor = width => Math.max(1, Math.min(8, Math.floor(600 / width)));

function enlarge(img, factor) {
  const fit = () => { img.style.width = `${img.naturalWidth * (factor || factorFor(img.naturalWidth))}px`; };
  img.complete && img.naturalWidth ? fit() : img.addEventListener("load", fit, {once: true});
  return img;
}

// An image with its caption; a list caption labels the columns of a strip.
function picture(source, caption, className = "answer") {
  const src = source instanceof Blob ? URL.createObjectURL(source) : source;
  const img = enlarge(element("img", {src, className, alt: [].concat(caption).join(" ")}));
  const label = Array.isArray(caption) ? element("figcaption", {className: "ticks"}, ...caption.map(text => element("span", {textContent: text})))
                                       : element("figcaption", {textContent: caption});
  return element("figure", {}, img, label);
}

// Two pictures at one display width, the one the wider image gets (an upscale's 96 px input was
// shown at 576 px beside its 384 px output, a projection's target at twice its reconstruction).
function alike(...figures) {
  const images = figures.map(figure => $("img", figure));
  const loaded = img => (img.complete && img.naturalWidth ? null : new Promise(resolve => img.addEventListener("load", resolve, {once: true})));
  Promise.all(images.map(loaded)).then(() => {
    const widest = Math.max(...images.map(img => img.naturalWidth));
    images.forEach(img => { img.style.width = `${widest * factorFor(widest)}px`; });
  });
  return element("div", {className: "pair"}, ...figures);
}

// Before/after at the same display size: the input stretched over the output, cut at the slider.
function comparison(input, output) {
  const after = element("img", {src: output, className: "after", alt: "after"});
  const before = element("img", {src: input, className: "before", alt: "before"});
  const slider = element("input", {type: "range", min: 0, max: 100, value: 50, ariaLabel: "before / after"});
  const frame = element("div", {className: "compare"}, after, before, slider);
  const cut = () => { before.style.clipPath = `inset(0 ${100 - slider.value}% 0 0)`; };
  slider.addEventListener("input", cut);
  after.addEventListener("load", () => { frame.style.width = `${Math.max(600, after.naturalWidth)}px`; }, {once: true});  // (max-width: 100% in CSS)
  cut();
  return element("figure", {}, frame, element("figcaption", {textContent: "before ◂ slide ▸ after"}));
}

/* ---------- the gallery ---------- */

const KIND_NAMES = {unconditional: "generator", conditional: "conditional generator", style: "style generator",
                    translation: "image translation", super_resolution: "super-resolution"};
const state = {models: [], details: {}, model: null, drawn: false, refresh: null};

function sizeOf(model, spec) {
  if (model.kind === "super_resolution") return `×${spec.scale || "?"} upscale`;
  if (model.kind === "translation") return `any size (trained at ${spec.train_resolution || "?"} px)`;
  return model.resolution ? `${model.resolution} px` : "";
}

function facts(model) {
  const spec = latestSpec(model);
  const versions = model.versions.length > 1 ? ` (of ${model.versions.map(v => `v${v}`).join(", ")})` : "";
  return [KIND_NAMES[model.kind] || model.kind, sizeOf(model, spec), `${model.channels === 1 ? "grey" : "RGB"}`,
          `v${model.latest_version}${versions}`, model.runtime ? `${model.runtime} on ${model.device}` : model.state].filter(Boolean);
}

const latestSpec = model => {
  const detail = state.details[model.name];
  const latest = detail && detail.versions.find(v => v.version === model.latest_version);
  return (latest && latest.spec) || {};
};

function card(model) {
  const source = `v1/models/${encodeURIComponent(model.name)}/samples.png?version=${model.latest_version}`;  // (a new version's own samples, not the cached ones)
  const samples = element("img", {src: source, alt: `samples of ${model.name}`});
  samples.addEventListener("error", () => samples.replaceWith(element("div", {className: "no-samples", textContent: model.ready ? "no samples" : model.state})));
  const item = element("button", {type: "button", className: `card ${model.state}`, title: model.error || `open ${model.name}`},
    samples, element("strong", {textContent: model.name}), element("span", {className: `kind ${model.kind}`, textContent: KIND_NAMES[model.kind] || model.kind}),
    ...[facts(model).slice(1, 3), facts(model).slice(3)].map(line => element("p", {className: "facts", textContent: line.join(" · ")})));
  item.dataset.model = model.name;
  item.addEventListener("click", () => choose(model.name));
  return item;
}

// The gallery follows the server: models load, finish loading, get new versions (a repository
// poll, a `load` through the repository API) or are unloaded while the page is open. The list is
// asked for every few seconds while the page is visible (one small GET), a model's details only
// when what the list says of it changed, and the gallery is redrawn only then.
const REFRESH_MS = {loading: 2000, settled: 5000};
const signature = model => JSON.stringify([model.state, model.latest_version, model.versions, model.error || ""]);

async function showGallery() {
  const gallery = $("#gallery");
  let models;
  try {
    if (document.hidden && state.models.length) return;  // (asked again when the page is shown)
    models = (await call("v1/models", {as: "json"})).body.models;
    const before = Object.fromEntries(state.models.map(m => [m.name, signature(m)]));
    const stale = models.filter(m => before[m.name] !== signature(m) || !(m.name in state.details));
    const details = await Promise.all(stale.map(m => call(`v1/models/${encodeURIComponent(m.name)}`, {as: "json"}).then(a => a.body, () => null)));
    stale.forEach((m, i) => { state.details[m.name] = details[i]; });
    if (state.drawn && !stale.length && models.length === state.models.length && !gallery.querySelector(".message.error")) return;
  } catch (error) {
    gallery.replaceChildren(element("p", {className: "message error", textContent: `the models could not be listed: ${error}`}));
    return;
  } finally {
    clearTimeout(state.refresh);  // (one timer, whoever asked: the timer itself or the page shown again)
    state.refresh = setTimeout(showGallery, (models || state.models).some(m => m.state === "loading") ? REFRESH_MS.loading : REFRESH_MS.settled);
  }
  const previous = state.model && state.models.find(m => m.name === state.model.name);
  state.models = models;
  state.drawn = true;
  gallery.replaceChildren(...(models.length ? models.map(card) : [element("p", {className: "message", textContent: "this server holds no models"})]));
  const chosen = state.model && models.find(m => m.name === state.model.name);
  if (chosen && (!previous || signature(chosen) !== signature(previous))) {  // its state or versions changed: its tools are rebuilt, what was typed kept
    const kept = inputsOf($("#bench"));
    choose(chosen.name, ($("#tools > form:not([hidden])") || {dataset: {}}).dataset.tool);
    restoreInputs($("#bench"), kept);
  } else if (chosen) $$(".card", gallery).forEach(c => c.classList.toggle("chosen", c.dataset.model === chosen.name));
}
document.addEventListener("visibilitychange", () => { if (!document.hidden) showGallery(); });

// What was typed and picked in a model's tools (and the class and truncation above them), by tool
// and field: a model that finished loading rebuilt its tools, and the seeds typed and the image
// chosen were lost.
function inputsOf(root) {
  const kept = new Map();
  for (const field of $$("input, select", root)) {
    if (!field.name) continue;
    const key = `${(field.closest("form") || {dataset: {}}).dataset.tool || "common"}/${field.name}`;
    kept.set(key, field.type === "file" ? field.files : field.value);
  }
  return kept;
}

function restoreInputs(root, kept) {
  for (const field of $$("input, select", root)) {
    const key = `${(field.closest("form") || {dataset: {}}).dataset.tool || "common"}/${field.name}`;
    if (!kept.has(key)) continue;
    if (field.type === "file") field.files = kept.get(key);  // (no change event: that would send it)
    else if (field.tagName !== "SELECT" || $$("option", field).some(option => option.value === kept.get(key))) field.value = kept.get(key);
    if (field.type === "range") field.dispatchEvent(new Event("input"));  // (its shown value follows it)
  }
}

/* ---------- the bench: one model's tools ---------- */

function choose(name, tool) {
  const model = state.models.find(m => m.name === name);
  if (!model) return false;
  const spec = latestSpec(model);
  state.model = {...model, spec, base: `v1/models/${encodeURIComponent(name)}`};
  $$(".card").forEach(c => c.classList.toggle("chosen", c.dataset.model === name));
  $("#bench").hidden = false;
  $("#model-name").textContent = name;
  const unready = model.ready ? [] : [model.runtime ? model.state : null, model.error].filter(Boolean);  // (facts name the state when no runtime is known)
  $("#model-facts").textContent = facts(model).join(" · ") + (unready.length ? ` — ${unready.join(": ")}` : "");
  showCommon(state.model);

  const tabs = $("#tabs"), tools = $("#tools");
  tabs.replaceChildren();
  tools.replaceChildren();
  for (const template of $$("template[data-kinds]")) {
    if (!template.dataset.kinds.split(" ").includes(model.kind)) continue;
    const id = template.id.replace("tool-", "");
    const form = template.content.firstElementChild.cloneNode(true);
    form.dataset.tool = id;
    TOOLS[id](form, state.model);
    tools.append(form);
    tabs.append(element("button", {type: "button", role: "tab", textContent: template.dataset.title, onclick: () => openTool(id)}));
    tabs.lastChild.dataset.tool = id;
  }
  openTool(tool && $(`#tools [data-tool="${CSS.escape(tool)}"]`) ? tool : tools.firstElementChild.dataset.tool);  // (a quote in the link's tool threw)
  return true;
}

function openTool(id) {
  $$("#tools > form").forEach(form => { form.hidden = form.dataset.tool !== id; });
  $$("#tabs > button").forEach(tab => tab.setAttribute("aria-selected", tab.dataset.tool === id));
  history.replaceState(null, "", `#${encodeURIComponent(state.model.name)}/${id}`);
}

// Class and truncation apply to every generating tool of the model, so they sit above the tabs.
function showCommon(model) {
  const common = $("#common");
  const classes = model.class_names || [];
  const select = $("select[name=class]", common);
  select.replaceChildren(element("option", {value: "", textContent: "by seed"}), ...classes.map((c, i) => element("option", {value: i, textContent: c === String(i) ? c : `${i}: ${c}`})));
  const needs = {classes: classes.length > 0, psi: model.kind === "style", biggan: Boolean(model.spec.truncation)};
  for (const label of $$("[data-needs]", common)) label.hidden = !needs[label.dataset.needs];
  if (model.spec.truncation) $("input[name=truncation]", common).value = model.spec.truncation.default;
  for (const range of $$("input[type=range]", common)) {
    const show = () => { range.nextElementSibling.textContent = Number(range.value).toFixed(2); };
    range.oninput = show;
    show();
  }
  common.hidden = !Object.values(needs).some(Boolean);
}

function commonParams(model) {
  const common = $("#common"), params = {};
  const label = $("select[name=class]", common).value;
  if (label !== "" && (model.class_names || []).length) params.class = Number(label);
  const psi = Number($("input[name=psi]", common).value);
  if (model.kind === "style" && psi !== 1) params.truncation_psi = psi;
  if (model.spec.truncation) params.truncation = Number($("input[name=truncation]", common).value);
  return params;
}

/* ---------- the tools ---------- */

// NaN goes to the API, which says why. A whole number past 2^53 is refused here: a browser's
// Number rounds it (a seed was silently another seed), and the API takes seeds up to 2^63 - 1.
const numberOf = input => {
  const text = input.value.trim();
  if (text === "") return NaN;
  const value = Number(text);
  if (Number.isInteger(value) && !Number.isSafeInteger(value)) {
    throw new Error(`${input.name} ${text} is past 2^53, where a browser's numbers round: send it through the API (curl, ganserve.client)`);
  }
  return value;
};
const seedList = text => text.split(/[\s,]+/).filter(Boolean).map(part => numberOf({name: "seed", value: part}));

// Runs `work(result)` on submit: it returns [answer, ...nodes to show] or throws (the error is shown).
function submits(form, work) {
  const result = resultBox($(".result", form));
  form.addEventListener("submit", async event => {
    event.preventDefault();
    const button = $(".controls button", form);
    button.disabled = true;
    result.working();
    try {
      const [answer, ...nodes] = await work(result);
      result.done(answer, ...nodes);
    } catch (error) {
      result.fail(error);
    } finally {
      button.disabled = false;
    }
  });
}

// A file field that also takes a dropped file; `onChosen` runs when one is picked either way.
function fileField(form, onChosen) {
  const input = form.elements.file, zone = input.closest(".drop");
  zone.addEventListener("dragover", event => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", event => {
    event.preventDefault();
    zone.classList.remove("over");
    input.files = event.dataTransfer.files;
    input.dispatchEvent(new Event("change"));
  });
  if (onChosen) input.addEventListener("change", onChosen);
  return () => {
    if (!input.files[0]) throw new ApiError(0, "", "choose an image first (or drop one on the field)");
    return input.files[0];
  };
}

function upload(file) {
  const form = new FormData();
  form.append("file", file);
  return form;
}

const TOOLS = {
  generate(form, model) {
    submits(form, async () => {
      const seed = numberOf(form.elements.seed), n = numberOf(form.elements.n);
      const answer = await call(`${model.base}/generate`, {json: {seed, n, columns: Math.min(n, 8) || 1, ...commonParams(model)}});
      return [answer, picture(answer.body, n === 1 ? `seed ${seed}` : `seeds ${seed}–${seed + n - 1}`)];
    });
  },

  // The mixed grid with its sources: the column seeds' images above it, the row seeds' beside it.
  "style-mix"(form, model) {
    submits(form, async () => {
      const rows = seedList(form.elements.rows.value), cols = seedList(form.elements.cols.value), layers = form.elements.layers.value;
      const common = commonParams(model);
      const [answer, top, side] = await Promise.all([
        call(`${model.base}/style-mix`, {json: {row_seeds: rows, col_seeds: cols, layers, ...common}}),
        call(`${model.base}/generate`, {json: {seeds: cols, columns: cols.length, ...common}}),
        call(`${model.base}/generate`, {json: {seeds: rows, columns: 1, ...common}}),
      ]);
      const factor = factorFor(cols.length * (model.resolution + 2) + 2);  // the grid's width (2 px padding)
      const image = (blob, className, alt) => enlarge(element("img", {src: URL.createObjectURL(blob), className, alt}), factor);
      const mix = element("div", {className: "mix"}, element("span", {className: "corner", textContent: "rows ╲ columns"}),
                          image(top.body, "source", `column seeds ${cols.join(", ")}`), image(side.body, "source", `row seeds ${rows.join(", ")}`),
                          image(answer.body, "answer", "mixed"));
      return [answer, element("figure", {}, mix, element("figcaption", {textContent: `rows ${rows.join(", ")} with the ${layers} styles of columns ${cols.join(", ")}`}))];
    });
  },

  interpolate(form, model) {
    submits(form, async () => {
      const seeds = [numberOf(form.elements.a), numberOf(form.elements.b)], steps = numberOf(form.elements.steps);
      const json = {seeds, steps, space: form.elements.space.value, format: form.elements.format.value, ...commonParams(model)};
      const answer = await call(`${model.base}/interpolate`, {json});
      return [answer, picture(answer.body, `seed ${seeds[0]} → ${seeds[1]}, ${steps} frames`)];
    });
  },

  edit(form, model) {
    const names = Object.keys(model.direction_spreads || {});
    const strips = $(".directions", form);
    if (!names.length) strips.append(element("p", {className: "message", textContent: model.ready ? "this model ships no edit directions"
      : `the model is ${model.state}: its directions are listed once it is ready`}));  // (a loading model said it shipped none)
    const render = names.map(direction => {
      const strength = element("input", {type: "range", name: `strength-${direction}`, min: 0.5, max: 4, step: 0.5, value: 2});
      const shown = element("output", {textContent: "±2σ"});
      const box = element("div", {className: "result"}, element("p", {className: "message"}), element("p", {className: "timing"}), element("div", {className: "output"}));
      strips.append(element("div", {className: "direction"}, element("label", {}, element("strong", {textContent: direction}), strength, shown), box));
      const result = resultBox(box);
      const run = async () => {
        const s = Number(strength.value), strengths = [-s, -s / 2, 0, s / 2, s];
        result.working();
        try {
          const json = {seed: numberOf(form.elements.seed), direction, strengths, units: "sigma", ...commonParams(model)};
          if (form.elements.layers.value) json.layers = form.elements.layers.value;
          const answer = await call(`${model.base}/edit`, {json});
          result.done(answer, picture(answer.body, strengths.map(v => (v ? `${v > 0 ? "+" : "−"}${Math.abs(v)}σ` : "0"))));
        } catch (error) {
          result.fail(error);
        }
      };
      strength.addEventListener("input", () => { shown.textContent = `±${strength.value}σ`; });
      strength.addEventListener("change", run);
      return run;
    });
    form.addEventListener("submit", async event => {
      event.preventDefault();
      const button = $(".controls button", form);
      button.disabled = true;
      await Promise.all(render.map(run => run()));
      button.disabled = false;
    });
  },

  project(form, model) {
    const chosen = fileField(form);
    const progress = $("progress", form), cancel = $("button.cancel", form);
    submits(form, async result => {
      const file = chosen(), steps = numberOf(form.elements.steps), started = performance.now();
      const submitted = await call(`${model.base}/project?steps=${steps}`, {body: upload(file), as: "json"});
      const jobUrl = `v1/jobs/${encodeURIComponent(submitted.body.job_id)}`;
      // the job goes on on the server until it ends or is cancelled: the page asks for that (DELETE), then polls on to its end
      cancel.onclick = () => { cancel.disabled = true; call(jobUrl, {method: "DELETE", as: "json"}).catch(error => result.fail(error)); };
      progress.hidden = cancel.hidden = false;
      cancel.disabled = false;
      let job, polls = 0;
      try {
        for (;;) {
          job = (await call(jobUrl, {as: "json"})).body;
          polls += 1;
          progress.max = job.progress.total;
          progress.value = job.progress.step;
          result.working(`${job.state}: step ${job.progress.step} of ${job.progress.total}${job.waiting ? ` (waiting for ${job.waiting})` : ""}`);
          if (!["queued", "running"].includes(job.state)) break;
          await new Promise(resolve => setTimeout(resolve, 250));
        }
      } finally {
        progress.hidden = cancel.hidden = true;
      }
      if (job.state !== "done") throw new ApiError(0, "", `projection ${job.state}${job.error ? `: ${job.error}` : ""}`);
      const reconstruction = `data:image/png;base64,${job.result.reconstruction.data}`;
      const pair = alike(picture(file, "target", "target"),
                         picture(reconstruction, `reconstruction · PSNR ${job.result.psnr.toFixed(1)} dB · ${job.result.steps} steps`));
      return [{latency: performance.now() - started, note: `upload to result: job ${job.id}, polled ${polls} times`}, pair];
    });
  },

  translate(form, model) { imageToImage(form, model, "translate"); },
  upscale(form, model) { imageToImage(form, model, "upscale"); },
};

// Translation and super-resolution: input and output side by side (and before/after for upscales), a download link.
function imageToImage(form, model, operation) {
  const chosen = fileField(form, () => form.requestSubmit());
  submits(form, async () => {
    const file = chosen(), format = form.elements.format.value;
    const answer = await call(`${model.base}/${operation}?format=${format}`, {body: upload(file)});
    const output = URL.createObjectURL(answer.body);
    const saveAs = `${file.name.replace(/\.[^.]*$/, "")}-${model.name}.${format === "jpeg" ? "jpg" : format}`;
    const pair = alike(picture(file, `input: ${file.name}`, "input"), picture(output, `output (${operation})`));
    const nodes = [pair];
    if (operation === "upscale") nodes.push(comparison(URL.createObjectURL(file), output));
    nodes.push(element("a", {href: output, download: saveAs, className: "download", textContent: `download ${saveAs}`}));
    return [answer, ...nodes];
  });
}

/* ---------- start ---------- */

// #name/tool opens a model's tool: links to it work, and so do back and forward
function followHash() {
  let name, tool;
  try {
    [name, tool] = decodeURIComponent(location.hash.slice(1)).split("/");
  } catch (error) {  // a malformed escape (#%E0%A4%A) threw URIError
    name = location.hash.slice(1);
  }
  $("#hash-notice").hidden = true;
  if (name && (!state.model || state.model.name !== name)) {
    if (!choose(name, tool) && state.models.length) {  // a link to a model this server does not serve: said, not silently ignored
      $("#hash-notice").textContent = `this server serves no model named ${JSON.stringify(name)}: pick one below`;
      $("#hash-notice").hidden = false;
      history.replaceState(null, "", location.pathname);
    }
  } else if (name && tool && $(`#tools [data-tool="${CSS.escape(tool)}"]`)) openTool(tool);
}
window.addEventListener("hashchange", followHash);
showGallery().then(followHash);
