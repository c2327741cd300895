"use strict";
// The sheaf playground: one panel per deployment, its form built from the request's JSON schema.
// Streams are POSTs, so they are read with fetch and a stream reader (EventSource only GETs).

const ROOT = location.pathname.replace(/\/ui(\/.*)?$/, ""); // where the deployments' routes live
const HIDDEN = new Set(["request_id", "model_type"]); // the page sets these itself
const COMMON = ["model_name", "timeout_s"]; // every request has them: shown last, after the model's own
const updates = []; // every update of a live view, in order: what the browser tests check
window.sheafUi = { updates };

// ---------- small helpers ----------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  node.append(...children.filter((child) => child !== null && child !== undefined));
  return node;
}

const SVG_NS = "http://www.w3.org/2000/svg";
function svgEl(tag, attrs = {}) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  return node;
}

function newRequestId() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16)); // randomUUID needs a secure context
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const hex = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

function blobToBase64(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1] || "");
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

const fmt = (x, digits = 2) => Number(x).toFixed(digits);

// Server-Sent Events from a fetch response: {id, event} per data frame, {comment} per comment line.
async function* readEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = [];
      let id = null;
      for (const line of frame.split("\n")) {
        if (line.startsWith(":")) {
          yield { comment: line.slice(1).trim() }; // `: accepted`, `: heartbeat`
          continue;
        }
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "data") data.push(text);
        else if (field === "id") id = text;
      }
      if (data.length) yield { id, event: JSON.parse(data.join("\n")) };
    }
  }
}

// What a refused request means to the user: a message, and the fields it names (422).
async function refusal(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    /* not JSON: the status says enough */
  }
  if (response.status === 503) {
    const retry = response.headers.get("Retry-After");
    return { message: retry ? `busy, retry in ${retry} s` : "busy, retry later", fields: {} };
  }
  const detail = body && body.detail;
  const fields = {};
  const general = [];
  if (Array.isArray(detail)) {
    for (const item of detail) {
      const loc = item.loc || [];
      const field = loc[0] === "body" ? loc[1] : undefined;
      if (field !== undefined) fields[field] = [fields[field], item.msg].filter(Boolean).join("; ");
      else general.push(item.msg);
    }
  } else if (detail) general.push(typeof detail === "string" ? detail : JSON.stringify(detail));
  const named = Object.keys(fields).length ? ` (see ${Object.keys(fields).join(", ")})` : "";
  return { message: `HTTP ${response.status}: ${general.join("; ") || "refused"}${named}`, fields };
}

// ---------- form fields from a JSON schema ----------

function resolve(prop, defs) {
  if (prop.$ref) return defs[prop.$ref.split("/").pop()] || {};
  if (prop.allOf && prop.allOf.length === 1) return { ...prop, ...resolve(prop.allOf[0], defs) };
  return prop;
}

// A field's schema without its `null` option; `nullable` says whether null was one.
function unwrap(prop, defs) {
  const options = prop.anyOf || [];
  const others = options.filter((option) => option.type !== "null");
  const nullable = others.length < options.length;
  const base = others.length ? resolve(others[0], defs) : resolve(prop, defs);
  return { ...prop, ...base, anyOf: undefined, nullable, title: prop.title || base.title };
}

function limitsText(prop) {
  const parts = [];
  const low = prop.minimum ?? prop.exclusiveMinimum;
  const high = prop.maximum ?? prop.exclusiveMaximum;
  if (low !== undefined || high !== undefined) {
    const lowText = low === undefined ? "" : `${prop.exclusiveMinimum !== undefined ? ">" : "≥"} ${low}`;
    const highText = high === undefined ? "" : `${prop.exclusiveMaximum !== undefined ? "<" : "≤"} ${high}`;
    parts.push([lowText, highText].filter(Boolean).join(", "));
  }
  if (prop.multipleOf) parts.push(`multiple of ${prop.multipleOf}`);
  if (prop.maxItems) parts.push(`at most ${prop.maxItems} items`);
  if (prop.nullable) parts.push("optional");
  return parts.join("; ");
}

const splitList = (text) => text.split(/[\s,;]+/).filter(Boolean);

// One form row: {name, row, read() -> value (undefined: leave it out), error (its message slot)}.
function buildField(name, rawProp, defs) {
  const prop = unwrap(rawProp, defs);
  const id = `f-${Math.random().toString(36).slice(2)}`;
  const error = el("span", { class: "field-error", "data-field": name });
  const hint = limitsText(prop);
  let input;
  let read;
  const wrap = (control) =>
    el(
      "div",
      { class: "field", "data-field": name, title: prop.description || "" },
      el("label", { for: id }, prop.title || name),
      control,
      hint ? el("small", { class: "limits" }, hint) : null,
      error,
    );

  if (prop.enum || prop.const !== undefined) {
    const choices = prop.enum || [prop.const];
    input = el("select", { id }, ...(prop.nullable ? [el("option", { value: "" }, "(default)")] : []),
      ...choices.map((choice) => el("option", { value: choice, selected: choice === prop.default }, String(choice))));
    read = () => (input.value === "" ? null : input.value);
  } else if (prop.type === "boolean") {
    input = el("input", { id, type: "checkbox", checked: prop.default === true });
    read = () => input.checked;
  } else if (prop.type === "integer" || prop.type === "number") {
    input = el("input", {
      id, type: "number", value: prop.default ?? "",
      min: prop.minimum ?? prop.exclusiveMinimum, max: prop.maximum ?? prop.exclusiveMaximum,
      step: prop.multipleOf || (prop.type === "integer" ? 1 : "any"),
    });
    read = () => (input.value.trim() === "" ? (prop.nullable ? null : undefined) : Number(input.value));
  } else if (prop.type === "array") {
    const items = resolve(prop.items || {}, defs);
    const numbers = items.type === "number" || items.type === "integer" || items.type === "array";
    const long = name === "history"; // a series: room for many values
    const attrs = { id, type: "text", placeholder: prop.default ? "comma separated" : "comma separated; empty: default" };
    input = long ? el("textarea", { ...attrs, rows: 3 }) : el("input", attrs);
    input.value = (prop.default || []).join(", ");
    read = () => {
      const parts = splitList(input.value);
      if (!parts.length) return prop.nullable ? null : undefined; // left out: the server's default
      return numbers ? parts.map(Number) : parts;
    };
  } else if (prop.type === "object") {
    return buildGroup(name, prop, defs, error);
  } else {
    const long = name.includes("prompt");
    input = long ? el("textarea", { id, rows: 2 }) : el("input", { id, type: "text" });
    input.value = prop.default ?? "";
    read = () => (input.value === "" && prop.nullable ? null : input.value);
  }
  return { name, row: wrap(input), read, error, input };
}

// A nested object (a `feature_ref`): its own fields, sent only while enabled.
function buildGroup(name, prop, defs, error) {
  const parts = Object.entries(prop.properties || {}).map(([key, sub]) => buildField(key, sub, defs));
  const row = el("fieldset", { class: "field group", "data-field": name },
    el("legend", {}, prop.title || name), ...parts.map((part) => part.row), error);
  const field = { name, row, error, enabled: !prop.nullable, parts };
  field.read = () => (field.enabled ? Object.fromEntries(parts.map((part) => [part.name, part.read()])) : null);
  return field;
}

// ---------- a panel ----------

class Panel {
  constructor(info) {
    this.info = info;
    this.name = info.name;
    this.schema = info.schema;
    this.fields = {};
    this.controller = null; // aborts the fetch being read: a stream, or a job's events
    this.view = VIEWS[info.model_type] ? new VIEWS[info.model_type](this) : new RawView(this);
    this.render();
  }

  render() {
    const defs = this.schema.$defs || {};
    const form = el("div", { class: "fields" });
    const properties = Object.entries(this.schema.properties || {});
    const ordered = [...properties.filter(([name]) => !COMMON.includes(name)),
      ...properties.filter(([name]) => COMMON.includes(name))];
    for (const [name, prop] of ordered) {
      if (HIDDEN.has(name) || this.view.skips.has(name)) continue;
      const field = buildField(name, prop, defs);
      this.fields[name] = field;
      form.append(field.row);
    }
    this.view.extendForm(form, this.fields);
    this.status = el("div", { class: "status" }, "idle");
    this.error = el("div", { class: "panel-error", role: "alert" });
    const button = (label, action, cls) => el("button", { type: "button", class: cls, onclick: action }, label);
    this.buttons = el("div", { class: "actions" },
      button("Predict", () => this.predict(), "predict"),
      button("Stream", () => this.stream(), "stream"),
      this.view.jobs ? button("Run as job", () => this.startJob(), "job") : null,
      button("Stop", () => this.stop(), "stop"),
      this.view.jobs ? button("Cancel job", () => this.cancelJob(), "cancel-job") : null);
    const limits = Object.entries(this.info.limits || {}).map(([key, value]) => `${key}: ${value}`).join(" · ");
    this.node = el("section", { class: "panel", id: `panel-${this.name}`, "data-deployment": this.name,
      "data-model-type": this.info.model_type, "data-state": "idle" },
      el("header", {}, el("h2", {}, this.name), el("span", { class: "model-type" }, this.info.model_type),
        el("small", { class: "deployment-limits" }, limits)),
      form, this.buttons, this.status, this.error, this.view.node);
    this.setState("idle");
  }

  setState(state, text) {
    this.node.dataset.state = state;
    this.node.classList.toggle("running", state === "running");
    if (text !== undefined) this.status.textContent = text;
  }

  record(kind) {
    updates.push({ deployment: this.name, kind, at: performance.now() });
  }

  clearErrors() {
    this.error.textContent = "";
    for (const node of this.node.querySelectorAll(".field-error")) node.textContent = "";
  }

  showRefusal({ message, fields }) {
    this.error.textContent = message;
    for (const [name, msg] of Object.entries(fields)) {
      const slot = this.node.querySelector(`.field-error[data-field="${name}"]`);
      if (slot) slot.textContent = msg;
    }
    this.view.onRefused();
    this.record("refused");
    this.setState("error", "refused");
  }

  // The request body, from the form; a fresh request_id each time, shown on the panel.
  body() {
    const body = { model_type: this.info.model_type, request_id: newRequestId() };
    for (const [name, field] of Object.entries(this.fields)) {
      const value = field.read();
      if (value !== undefined) body[name] = value;
    }
    this.view.fillBody(body);
    this.node.dataset.requestId = body.request_id;
    return body;
  }

  async begin(label) {
    this.stop();
    this.clearErrors();
    localStorage.removeItem(this.jobKey); // a new run replaces the job a reload would reattach to
    let body;
    try {
      body = await this.view.prepare(this.body());
    } catch (problem) {
      this.showRefusal({ message: String(problem.message || problem), fields: problem.fields || {} });
      return null;
    }
    this.view.reset(body);
    this.setState("running", `${label} ${body.request_id}…`);
    this.controller = new AbortController();
    return body;
  }

  post(route, body) {
    return fetch(`${ROOT}/${this.name}/${route}`, {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body), signal: this.controller.signal,
    });
  }

  async predict() {
    const body = await this.begin("predict");
    if (!body) return;
    await this.guard(async () => {
      const response = await this.post("predict", body);
      if (!response.ok) return this.showRefusal(await refusal(response));
      this.finish(await response.json());
    });
  }

  async stream() {
    const body = await this.begin("stream");
    if (!body) return;
    await this.guard(async () => {
      const response = await this.post("stream", body);
      if (!response.ok) return this.showRefusal(await refusal(response));
      await this.consume(response);
    });
  }

  // Reads a stream's (or a job's) events until the terminal one; `onId` keeps each event's id.
  async consume(response, onId = () => {}) {
    for await (const { id, event, comment } of readEvents(response)) {
      if (comment !== undefined) {
        if (comment === "accepted") this.status.textContent += " accepted";
        continue;
      }
      if (id !== null) onId(id);
      if (this.handle(event)) return true;
    }
    return false;
  }

  handle(event) {
    switch (event.type) {
      case "result":
        this.finish(event);
        return true;
      case "error":
        this.error.textContent = `stream error${event.code ? ` (${event.code})` : ""}: ${event.error}`;
        this.record("error");
        this.setState("error", "failed");
        return true;
      case "cancelled":
        this.record("cancelled");
        this.setState("stopped", "job cancelled");
        return true;
      case "queued":
        this.status.textContent = `queued, ${event.position} ahead`;
        this.record("queued");
        return false;
      default:
        this.view.onEvent(event);
        this.record(event.type);
        return false;
    }
  }

  finish(result) {
    this.view.onResult(result);
    this.record("result");
    this.setState("done", `done: ${result.request_id}`);
  }

  async guard(work) {
    try {
      await work();
      if (this.node.dataset.state === "running") this.setState("error", "the stream ended without a result");
    } catch (problem) {
      if (problem.name === "AbortError") return; // stopped on purpose
      this.error.textContent = `cannot reach the server: ${problem.message}`;
      this.setState("error", "failed");
    } finally {
      this.controller = null;
    }
  }

  // Dropping the connection is what stops a stream: the server cancels the model's work.
  stop() {
    if (!this.controller) return;
    this.controller.abort();
    this.controller = null;
    this.view.onStop();
    this.record("stopped");
    this.setState("stopped", "stopped");
  }

  // ----- jobs: the id in localStorage, so a reload reattaches to its events -----

  get jobKey() {
    return `sheaf-ui:job:${ROOT}:${this.name}`;
  }

  async startJob() {
    const body = await this.begin("job");
    if (!body) return;
    await this.guard(async () => {
      const response = await this.post("jobs", body);
      if (response.status !== 202) return this.showRefusal(await refusal(response));
      const { job_id: jobId } = await response.json();
      localStorage.setItem(this.jobKey, JSON.stringify({ jobId, body: this.view.remember(body) }));
      await this.follow(jobId);
    });
  }

  // Replays the job's log from its start (so a reloaded page redraws it all), then its live events;
  // a dropped connection resumes after the last event seen.
  async follow(jobId) {
    this.node.dataset.jobId = jobId;
    let after = 0;
    for (let attempt = 0; attempt < 5; attempt++) {
      this.setState("running", `job ${jobId}`);
      const response = await fetch(`${ROOT}/${this.name}/jobs/${jobId}/events?after=${after}`,
        { signal: this.controller.signal });
      if (response.status === 404) {
        localStorage.removeItem(this.jobKey);
        this.error.textContent = `job ${jobId} is gone (expired or unknown)`;
        return this.setState("error", "job gone");
      }
      if (!response.ok) return this.showRefusal(await refusal(response));
      if (await this.consume(response, (id) => (after = Number(id)))) return;
      await new Promise((wake) => setTimeout(wake, 1000));
    }
  }

  async reattach() {
    const saved = JSON.parse(localStorage.getItem(this.jobKey) || "null");
    if (!saved) return;
    this.view.reset(saved.body || {});
    this.controller = new AbortController();
    await this.guard(() => this.follow(saved.jobId));
  }

  async cancelJob() {
    const jobId = this.node.dataset.jobId;
    if (!jobId) return;
    const response = await fetch(`${ROOT}/${this.name}/jobs/${jobId}`, { method: "DELETE" });
    if (!response.ok) this.showRefusal(await refusal(response));
  }
}

// ---------- the live views, one per model type ----------

class RawView {
  constructor(panel) {
    this.panel = panel;
    this.skips = new Set();
    this.jobs = false;
    this.node = el("pre", { class: "view raw" });
  }
  extendForm() {}
  fillBody() {}
  async prepare(body) {
    return body;
  }
  remember(body) {
    return body;
  }
  reset() {
    this.node.textContent = "";
  }
  onEvent(event) {
    this.node.textContent += `${JSON.stringify(event)}\n`;
  }
  onResult(result) {
    this.node.textContent += JSON.stringify(result, null, 2);
  }
  onStop() {}
  onRefused() {}
}

class DiffusionView extends RawView {
  constructor(panel) {
    super(panel);
    this.skips = new Set(["adapters", "adapter_weights"]);
    this.jobs = true;
    this.bar = el("progress", { class: "progress", max: 1, value: 0 });
    this.stepText = el("span", { class: "step" });
    this.preview = el("img", { class: "preview", alt: "preview" });
    this.image = el("img", { class: "result-image", alt: "result" });
    this.seed = el("div", { class: "seed" });
    this.node = el("div", { class: "view diffusion" }, el("div", { class: "bar" }, this.bar, this.stepText),
      el("div", { class: "images" }, this.preview, this.image), this.seed);
  }

  // Adapters: the deployment's default, or a chosen set with optional weights.
  extendForm(form, fields) {
    if (fields.prompt && !fields.prompt.input.value) fields.prompt.input.value = "a red fox in snow";
    const { adapters, default_adapters: defaults } = this.panel.info;
    if (!adapters.length) return;
    this.useDefault = el("input", { type: "checkbox", checked: true, class: "adapters-default" });
    this.choices = adapters.map((name) => ({
      name,
      box: el("input", { type: "checkbox", class: "adapter", value: name, checked: defaults.includes(name) }),
      weight: el("input", { type: "number", class: "adapter-weight", step: "any", min: -10, max: 10, placeholder: "weight" }),
    }));
    const error = el("span", { class: "field-error", "data-field": "adapters" });
    const weightError = el("span", { class: "field-error", "data-field": "adapter_weights" });
    // Before the fields every request has (model name, timeout), with the model's own.
    form.insertBefore(el("fieldset", { class: "field group adapters", "data-field": "adapters" },
      el("legend", {}, "Adapters"),
      el("label", {}, this.useDefault, ` deployment default (${defaults.join(", ") || "none"})`),
      ...this.choices.map(({ name, box, weight }) => el("label", { class: "adapter-choice" }, box, ` ${name} `, weight)),
      error, weightError), fields.model_name?.row ?? null);
  }

  fillBody(body) {
    if (!this.choices || this.useDefault.checked) return; // null: the deployment's default
    const chosen = this.choices.filter((choice) => choice.box.checked);
    body.adapters = chosen.map((choice) => choice.name);
    if (chosen.some((choice) => choice.weight.value !== "")) {
      body.adapter_weights = chosen.map((choice) => (choice.weight.value === "" ? 1 : Number(choice.weight.value)));
    }
  }

  remember(body) {
    return { num_inference_steps: body.num_inference_steps };
  }

  reset(body) {
    this.bar.max = body.num_inference_steps || 1;
    this.bar.value = 0;
    this.stepText.textContent = "";
    this.preview.removeAttribute("src");
    this.image.removeAttribute("src");
    this.seed.textContent = "";
  }

  onEvent(event) {
    if (event.type !== "progress") return;
    this.bar.max = event.total_steps;
    this.bar.value = event.step;
    this.stepText.textContent = `step ${event.step} / ${event.total_steps}`;
    if (event.preview_b64) this.preview.src = `data:image/png;base64,${event.preview_b64}`;
  }

  onResult(result) {
    this.bar.value = this.bar.max;
    this.image.src = `data:image/png;base64,${result.image_b64}`;
    this.seed.textContent = `seed ${result.seed} · ${result.width}×${result.height}`;
  }
}

class AudioView extends RawView {
  constructor(panel) {
    super(panel);
    this.skips = new Set(["audio_b64"]);
    this.jobs = true;
    this.audio = null; // {name, blob}
    this.segments = el("ol", { class: "segments" });
    this.transcript = el("p", { class: "transcript" });
    this.node = el("div", { class: "view audio" }, this.segments, this.transcript);
  }

  extendForm(form) {
    this.file = el("input", { type: "file", accept: "audio/*", class: "audio-file",
      onchange: () => this.choose(this.file.files[0], this.file.files[0]?.name) });
    this.chosen = el("span", { class: "audio-chosen" }, "no audio yet");
    const error = el("span", { class: "field-error", "data-field": "audio_b64" });
    const row = el("div", { class: "field audio-input", "data-field": "audio_b64" },
      el("label", {}, "Audio"), this.file, this.recorderButton(), this.chosen, error);
    form.prepend(row);
  }

  // The microphone, where the browser gives one (a secure context and MediaRecorder).
  recorderButton() {
    if (!navigator.mediaDevices?.getUserMedia || !window.MediaRecorder) return null;
    const button = el("button", { type: "button", class: "record" }, "Record");
    let recorder = null;
    button.addEventListener("click", async () => {
      if (recorder) return recorder.stop();
      try {
        const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
        const pieces = [];
        recorder = new MediaRecorder(stream);
        recorder.ondataavailable = (event) => pieces.push(event.data);
        recorder.onstop = () => {
          stream.getTracks().forEach((track) => track.stop());
          this.choose(new Blob(pieces, { type: recorder.mimeType }), "recording");
          recorder = null;
          button.textContent = "Record";
        };
        recorder.start();
        button.textContent = "Stop recording";
      } catch (problem) {
        this.chosen.textContent = `no microphone: ${problem.message}`;
      }
    });
    return button;
  }

  choose(blob, name) {
    if (!blob) return;
    this.audio = { blob, name };
    this.chosen.textContent = `${name} (${Math.round(blob.size / 1024)} KiB)`;
  }

  async prepare(body) {
    if (!this.audio) throw Object.assign(new Error("choose an audio file or record one first"),
      { fields: { audio_b64: "required" } });
    return { ...body, audio_b64: await blobToBase64(this.audio.blob) };
  }

  remember() {
    return {};
  }

  reset() {
    this.segments.textContent = "";
    this.transcript.textContent = "";
  }

  addSegment(segment) {
    this.segments.append(el("li", { class: "segment" },
      el("span", { class: "time" }, `[${fmt(segment.start)} – ${fmt(segment.end)}]`), ` ${segment.text.trim()}`));
  }

  onEvent(event) {
    if (event.type === "segment") this.addSegment(event.segment);
  }

  onResult(result) {
    if (!this.segments.children.length) result.segments.forEach((segment) => this.addSegment(segment));
    this.transcript.textContent = result.text.trim();
    this.transcript.dataset.language = result.language;
  }
}

class ChatView extends RawView {
  constructor(panel) {
    super(panel);
    this.skips = new Set(["prompt", "messages"]);
    this.turns = []; // the conversation so far, sent as `messages`
    this.log = el("div", { class: "chat" });
    this.node = el("div", { class: "view textgen" }, this.log);
  }

  extendForm(form) {
    this.message = el("textarea", { class: "message", rows: 2, placeholder: "Your message" });
    this.message.value = "Write one sentence about the sea.";
    const clear = el("button", { type: "button", class: "clear", onclick: () => {
      this.turns = [];
      this.log.textContent = "";
    } }, "New chat");
    form.prepend(el("div", { class: "field chat-input", "data-field": "messages" }, el("label", {}, "Message"),
      this.message, clear, el("span", { class: "field-error", "data-field": "messages" }),
      el("span", { class: "field-error", "data-field": "prompt" })));
  }

  fillBody(body) {
    body.messages = [...this.turns, { role: "user", content: this.message.value }];
  }

  turn(role, text) {
    const node = el("div", { class: `turn ${role}` }, el("b", {}, `${role}: `), el("span", { class: "text" }, text));
    this.log.append(node);
    return node.querySelector(".text");
  }

  reset(body) {
    this.pending = body.messages ? body.messages[body.messages.length - 1] : null;
    const asked = this.pending ? this.turn("user", this.pending.content).parentElement : null;
    this.reply = this.turn("assistant", "");
    this.reply.parentElement.classList.add("generating");
    this.drawn = [asked, this.reply.parentElement].filter(Boolean);
  }

  // A refused request leaves no turn behind: the user may fix the field and send it again.
  onRefused() {
    this.drawn?.forEach((node) => node.remove());
    this.drawn = [];
    this.pending = null;
    this.reply = null;
  }

  settle(text, note) {
    this.drawn = [];
    this.reply.textContent = text;
    this.reply.parentElement.classList.remove("generating");
    if (note) this.reply.parentElement.append(el("small", { class: "note" }, ` (${note})`));
    if (this.pending) this.turns.push(this.pending, { role: "assistant", content: text });
    this.pending = null;
  }

  onEvent(event) {
    if (event.type === "token") this.reply.textContent += event.text;
  }

  onResult(result) {
    this.settle(result.text, `${result.finish_reason}, ${result.completion_tokens} tokens`);
  }

  onStop() {
    if (this.drawn?.length) this.settle(this.reply.textContent, "stopped");
  }
}

class ForecastView extends RawView {
  constructor(panel) {
    super(panel);
    this.history = null;
    this.svg = svgEl("svg", { class: "plot", viewBox: "0 0 640 240", width: 640, height: 240 });
    this.caption = el("div", { class: "caption" });
    this.node = el("div", { class: "view forecast" }, this.svg, this.caption);
  }

  // The history comes typed or from the feature store: exactly one of them is sent.
  extendForm(form, fields) {
    const history = fields.history;
    const ref = fields.feature_ref;
    if (!history || !ref) return;
    history.input.value = Array.from({ length: 48 }, (_, i) => fmt(10 + 5 * Math.sin((2 * Math.PI * i) / 24), 2))
      .join(", ");
    const demo = { feature_view: "series_history", feature_name: "values", entity_key: "series_id",
      entity_value: "temperature" }; // the demo store of `make serve`
    for (const part of ref.parts) if (part.input) part.input.value = demo[part.name] ?? "";
    this.source = el("select", { class: "history-source" },
      el("option", { value: "typed" }, "typed values"), el("option", { value: "feature_ref" }, "the feature store"));
    const typed = history.read;
    history.read = () => (ref.enabled ? null : typed());
    const show = () => {
      ref.enabled = this.source.value === "feature_ref";
      ref.row.hidden = !ref.enabled;
      history.row.hidden = ref.enabled;
    };
    this.source.addEventListener("change", show);
    form.prepend(el("div", { class: "field" }, el("label", {}, "History from"), this.source));
    show();
  }

  reset(body) {
    this.history = Array.isArray(body.history)
      ? body.history.map((row) => (Array.isArray(row) ? row[body.target_index || 0] : row)) : null;
    this.svg.textContent = "";
    this.caption.textContent = "";
  }

  onResult(result) {
    this.draw(this.history || [], result);
    const levels = Object.keys(result.quantiles || {}).sort((a, b) => Number(a) - Number(b));
    const band = levels.length ? `; band: quantiles ${levels[0]} to ${levels[levels.length - 1]}` : "";
    this.caption.textContent = `${result.horizon} steps of ${result.frequency}; history ${
      this.history ? `${this.history.length} values` : "from the feature store (not shown)"}; mean${band}`;
  }

  // History (the last 3 horizons of it), the mean with one point per step, and the quantile band.
  draw(fullHistory, result) {
    const W = 640, H = 240, PAD = 28;
    const history = fullHistory.slice(-Math.max(3 * result.horizon, 24));
    const levels = Object.keys(result.quantiles || {}).sort((a, b) => Number(a) - Number(b));
    const low = levels.length ? result.quantiles[levels[0]] : null;
    const high = levels.length ? result.quantiles[levels[levels.length - 1]] : null;
    const values = [...history, ...result.mean, ...(low || []), ...(high || [])].filter(Number.isFinite);
    let min = Math.min(...values), max = Math.max(...values);
    if (min === max) [min, max] = [min - 1, max + 1];
    const count = history.length + result.mean.length;
    const x = (i) => PAD + (i * (W - 2 * PAD)) / Math.max(count - 1, 1);
    const y = (v) => H - PAD - ((v - min) * (H - 2 * PAD)) / (max - min);
    const at = (offset) => (v, i) => `${fmt(x(offset + i), 1)},${fmt(y(v), 1)}`;
    const start = history.length;
    this.svg.append(svgEl("line", { class: "axis", x1: PAD, y1: H - PAD, x2: W - PAD, y2: H - PAD }),
      svgEl("line", { class: "now", x1: x(start - 0.5), y1: PAD, x2: x(start - 0.5), y2: H - PAD }));
    for (const [value, cls] of [[max, "top"], [min, "bottom"]]) {
      const label = svgEl("text", { class: `label ${cls}`, x: 2, y: y(value) + 4 });
      label.textContent = fmt(value, 1);
      this.svg.append(label);
    }
    if (low && high) {
      const band = [...high.map(at(start)), ...low.map(at(start)).reverse()].join(" ");
      this.svg.append(svgEl("polygon", { class: "band", points: band }));
    }
    if (history.length) this.svg.append(svgEl("polyline", { class: "history", points: history.map(at(0)).join(" ") }));
    this.svg.append(svgEl("polyline", { class: "mean", points: result.mean.map(at(start)).join(" ") }));
    result.mean.forEach((v, i) => this.svg.append(svgEl("circle", { class: "mean-point", cx: x(start + i), cy: y(v), r: 2.5 })));
  }
}

const VIEWS = { diffusion: DiffusionView, audio: AudioView, text_generation: ChatView, time_series: ForecastView };

// ---------- start ----------

async function main() {
  const container = document.getElementById("panels");
  try {
    const response = await fetch(`${ROOT}/ui/deployments`);
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const { deployments } = await response.json();
    const panels = deployments.map((info) => new Panel(info));
    container.replaceChildren(...panels.map((panel) => panel.node));
    panels.forEach((panel) => panel.reattach()); // a job started before a reload goes on showing
    window.sheafUi.ready = true;
  } catch (problem) {
    container.replaceChildren(el("p", { class: "panel-error" }, `cannot load the deployments: ${problem.message}`));
  }
}

main();
