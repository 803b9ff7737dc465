// The runs page: a card per training run under the server's --runs folder, with its loss curves drawn
// on a canvas (growing while the run trains: the page polls for rows after the last step it has), its
// settings and checkpoints, and a button that loads a checkpoint into the server to chat with it.
"use strict";

const METRICS_POLL_MS = 3000;
const RUNS_POLL_MS = 15000;
const COLORS = ["#b5532a", "#2a6fb5", "#3a9a4a", "#8a4ab5", "#b59a2a", "#2aa5b5"];

const runs = new Map(); // name -> {card, rows, lastStep}

function showStatus(message, isError = false) {
  const status = document.getElementById("status");
  status.textContent = message;
  status.classList.toggle("error", isError);
  status.hidden = !message;
}

function explain(error) {
  if (error.status === 401) return `${error.message}. Enter the server's key in "API key" on the chat page.`;
  return error.message || String(error);
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function formatNumber(value) {
  if (typeof value !== "number") return String(value);
  if (Number.isInteger(value)) return value.toLocaleString("en");
  return Math.abs(value) >= 1000 ? Math.round(value).toLocaleString("en") : String(Number(value.toPrecision(4)));
}

// --- the loss curves -------------------------------------------------------------------------------

// Every key of the rows that holds a loss (train_loss, val_loss, step_loss, ...), in the order first seen.
function lossKeys(rows) {
  const keys = [];
  for (const row of rows) {
    for (const [key, value] of Object.entries(row)) {
      if (key.includes("loss") && typeof value === "number" && !keys.includes(key)) keys.push(key);
    }
  }
  return keys;
}

// About `count` round tick values from lo to hi.
function niceTicks(lo, hi, count) {
  const span = hi - lo;
  const magnitude = 10 ** Math.floor(Math.log10(span / count));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * magnitude).find((s) => span / s <= count) || span;
  const ticks = [];
  for (let tick = Math.ceil(lo / step) * step; tick <= hi + step * 1e-9; tick += step) ticks.push(tick);
  return ticks;
}

function widened(lo, hi, margin) {
  if (lo === hi) return [lo - 1, hi + 1];
  const pad = (hi - lo) * margin;
  return [lo - pad, hi + pad];
}

function drawCurves(canvas, rows) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 600;
  const height = canvas.clientHeight || 260;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const styles = getComputedStyle(document.documentElement);
  const ink = getComputedStyle(document.body).color;
  const grid = styles.getPropertyValue("--line").trim() || "#ccc";
  ctx.font = "12px system-ui, sans-serif";
  ctx.fillStyle = ink;

  const keys = lossKeys(rows);
  const points = keys.flatMap((key) => rows.filter((row) => typeof row[key] === "number").map((row) => [row.step, row[key]]));
  canvas.dataset.points = String(points.length);
  if (points.length === 0) {
    ctx.textAlign = "center";
    ctx.fillText("no losses logged yet", width / 2, height / 2);
    return;
  }
  const pad = { left: 58, right: 16, top: 30, bottom: 36 };
  const [x0, x1] = widened(Math.min(...points.map((p) => p[0])), Math.max(...points.map((p) => p[0])), 0);
  const [y0, y1] = widened(Math.min(...points.map((p) => p[1])), Math.max(...points.map((p) => p[1])), 0.06);
  const x = (step) => pad.left + ((step - x0) / (x1 - x0)) * (width - pad.left - pad.right);
  const y = (loss) => height - pad.bottom - ((loss - y0) / (y1 - y0)) * (height - pad.top - pad.bottom);

  ctx.strokeStyle = grid;
  ctx.lineWidth = 1;
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (const tick of niceTicks(y0, y1, 5)) {
    ctx.beginPath();
    ctx.moveTo(pad.left, y(tick));
    ctx.lineTo(width - pad.right, y(tick));
    ctx.stroke();
    ctx.fillText(formatNumber(tick), pad.left - 6, y(tick));
  }
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  for (const tick of niceTicks(x0, x1, 6).filter(Number.isInteger)) {
    ctx.fillText(formatNumber(tick), x(tick), height - pad.bottom + 6);
  }
  ctx.fillText("step", (pad.left + width - pad.right) / 2, height - 16);
  ctx.strokeRect(pad.left, pad.top, width - pad.left - pad.right, height - pad.top - pad.bottom);

  let legendX = pad.left;
  keys.forEach((key, index) => {
    const color = COLORS[index % COLORS.length];
    const series = rows.filter((row) => typeof row[key] === "number");
    ctx.strokeStyle = color;
    ctx.fillStyle = color;
    ctx.lineWidth = 2;
    ctx.beginPath();
    series.forEach((row, i) => (i === 0 ? ctx.moveTo(x(row.step), y(row[key])) : ctx.lineTo(x(row.step), y(row[key]))));
    ctx.stroke();
    if (series.length < 40) {
      for (const row of series) {
        ctx.beginPath();
        ctx.arc(x(row.step), y(row[key]), 2.5, 0, 2 * Math.PI);
        ctx.fill();
      }
    }
    ctx.fillRect(legendX, 10, 12, 12);
    ctx.fillStyle = ink;
    ctx.textAlign = "left";
    ctx.textBaseline = "middle";
    ctx.fillText(key, legendX + 16, 16);
    legendX += 28 + ctx.measureText(key).width;
  });
}

// --- a run's card ------------------------------------------------------------------------------------

function plural(count, noun) {
  return `${count} ${noun}${count === 1 ? "" : "s"}`;
}

function describeModel(settings) {
  const model = settings.model;
  const parts = [];
  if (model) {
    parts.push(
      `${plural(model.n_layer, "layer")}, ${plural(model.n_head, "head")}, ${model.n_embd} wide, ` +
        `context ${model.block_size}, vocab ${model.vocab_size} (${model.block_style || "gpt2"})`,
    );
  }
  if (settings.optim) parts.push(`${settings.optim.optimizer} lr ${formatNumber(settings.optim.lr)}`);
  if (settings.finetune) parts.push(`fine-tuned on ${settings.finetune.data}${settings.finetune.lora ? " with LoRA" : ""}`);
  return parts.join(" \u00B7 ");
}

// Nested settings as dotted names ("model.n_layer") beside their values.
function flatten(settings, prefix = "", into = []) {
  for (const [key, value] of Object.entries(settings)) {
    const name = prefix + key;
    if (value && typeof value === "object" && !Array.isArray(value)) flatten(value, name + ".", into);
    else into.push([name, Array.isArray(value) ? JSON.stringify(value) : String(value)]);
  }
  return into;
}

function lastRowText(row) {
  if (!row) return "no metrics yet";
  return Object.entries(row)
    .map(([key, value]) => `${key} ${value === null ? "-" : formatNumber(value)}`)
    .join("  \u00B7  ");
}

function makeCard(run) {
  const card = element("article", "run");
  card.dataset.run = run.name;
  const canvas = element("canvas");
  canvas.setAttribute("role", "img");
  canvas.setAttribute("aria-label", `loss curves of ${run.name}`);
  card.append(
    element("h2", "", run.name),
    element("p", "summary"),
    canvas,
    element("p", "last"),
    element("div", "checkpoints"),
    element("p", "error"),
    element("details", "settings"),
  );
  return card;
}

function updateCard(entry, run) {
  const { card } = entry;
  const steps = run.step !== null && run.step !== undefined ? `step ${formatNumber(run.step)}` : "no checkpoint yet";
  const updated = new Date(run.updated * 1000).toLocaleString();
  card.querySelector(".summary").textContent = [steps, describeModel(run.settings), `updated ${updated}`]
    .filter(Boolean)
    .join(" \u00B7 ");
  const checkpoints = card.querySelector(".checkpoints");
  checkpoints.replaceChildren(element("span", "hint", run.checkpoints.length ? "Checkpoints:" : "No checkpoints yet."));
  for (const checkpoint of run.checkpoints) {
    const button = element("button", "chat-with", `Chat with ${checkpoint.name}/`);
    button.type = "button";
    const loss = typeof checkpoint.best_val_loss === "number" ? `, val loss ${formatNumber(checkpoint.best_val_loss)}` : "";
    button.title = `${checkpoint.kind} at step ${checkpoint.step ?? "?"}${loss}`;
    button.addEventListener("click", () => chatWith(card, run.name, checkpoint.name, button));
    checkpoints.append(button);
  }
  const details = card.querySelector(".settings");
  const list = element("dl");
  for (const [name, value] of flatten(run.settings)) list.append(element("dt", "", name), element("dd", "", value));
  details.replaceChildren(element("summary", "", "Settings"), list);
}

async function chatWith(card, name, checkpoint, button) {
  const error = card.querySelector(".error");
  error.textContent = "";
  button.disabled = true;
  const label = button.textContent;
  button.textContent = "Loading\u2026";
  try {
    const reply = await Kiln.json(`/api/runs/${encodeURIComponent(name)}/chat`, {
      method: "POST",
      body: { checkpoint },
    });
    location.href = `/?model=${encodeURIComponent(reply.model)}`;
  } catch (failure) {
    error.textContent = `Could not load ${checkpoint}/: ${explain(failure)}`;
  } finally {
    button.disabled = false;
    button.textContent = label;
  }
}

// --- polling ---------------------------------------------------------------------------------------------

async function pollMetrics(name, entry) {
  const after = entry.lastStep === null ? "" : `?after=${entry.lastStep}`;
  const rows = (await Kiln.json(`/api/runs/${encodeURIComponent(name)}/metrics${after}`)).data;
  if (rows.length === 0 && entry.drawn) return;
  entry.rows.push(...rows);
  if (entry.rows.length) entry.lastStep = entry.rows[entry.rows.length - 1].step;
  entry.card.querySelector(".last").textContent = lastRowText(entry.rows[entry.rows.length - 1]);
  drawCurves(entry.card.querySelector("canvas"), entry.rows);
  entry.drawn = true;
}

async function refreshRuns() {
  let listing;
  try {
    listing = await Kiln.json("/api/runs");
  } catch (error) {
    showStatus(`Could not list the runs: ${explain(error)}`, true);
    return;
  }
  showStatus("");
  const where = document.getElementById("where");
  where.textContent = listing.runs_dir
    ? `Runs in ${listing.runs_dir}${listing.data.length ? "" : ": none yet (train one with kiln train --out there)"}`
    : "This server shows no runs: start it with --runs FOLDER.";
  const section = document.getElementById("runs");
  for (const run of listing.data) {
    if (!runs.has(run.name)) {
      const entry = { card: makeCard(run), rows: [], lastStep: null, drawn: false };
      runs.set(run.name, entry);
      section.append(entry.card);
    }
    updateCard(runs.get(run.name), run);
  }
  const present = new Set(listing.data.map((run) => run.name));
  for (const [name, entry] of runs) {
    if (!present.has(name)) {
      entry.card.remove();
      runs.delete(name);
    }
  }
}

async function pollAllMetrics() {
  for (const [name, entry] of runs) {
    try {
      await pollMetrics(name, entry);
    } catch (error) {
      entry.card.querySelector(".error").textContent = `Could not read the metrics: ${explain(error)}`;
    }
  }
}

// Runs one poll at a time, then schedules the next: a slow server never piles up requests.
function every(milliseconds, poll) {
  const loop = async () => {
    await poll();
    setTimeout(loop, milliseconds);
  };
  return loop();
}

async function start() {
  await refreshRuns();
  await pollAllMetrics();
  document.body.dataset.ready = "true"; // for tests and scripts: the first listing is drawn
  setTimeout(() => every(METRICS_POLL_MS, pollAllMetrics), METRICS_POLL_MS);
  setTimeout(() => every(RUNS_POLL_MS, refreshRuns), RUNS_POLL_MS);
  window.addEventListener("resize", () => {
    for (const entry of runs.values()) drawCurves(entry.card.querySelector("canvas"), entry.rows);
  });
}

start();
