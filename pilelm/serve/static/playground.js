// pilelm playground: streams POST /v1/completions (server-sent events) into the page.
// No dependencies and no external resources, so it works on an offline machine.
"use strict";

const $ = (id) => document.getElementById(id);
const sliders = ["max_tokens", "temperature", "top_p", "top_k", "repetition_penalty"];
const REASONS = { length: "hit max tokens", stop: "end of text or stop sequence", user: "stopped by you" };
let controller = null;
let modelName = null;

function showValues() {
  for (const id of sliders) $(id + "_v").textContent = $(id).value;
}

function unescape(s) {
  return s.replace(/\\n/g, "\n").replace(/\\t/g, "\t");
}

function apiHeaders() {
  const headers = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) headers["Authorization"] = "Bearer " + key;
  return headers;
}

async function loadHealth() {
  try {
    const h = await (await fetch("/health")).json();
    modelName = h.model;
    $("model").textContent = `${h.model} · context ${h.limits.context}`;
    $("max_tokens").max = h.limits.max_tokens;
    if (+$("max_tokens").value > h.limits.max_tokens) $("max_tokens").value = h.limits.max_tokens;
    $("key_control").hidden = !h.auth;
    showValues();
  } catch (e) {
    $("model").textContent = "server unreachable";
  }
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function setRunning(running) {
  $("generate").disabled = running;
  $("stop").disabled = !running;
  $("output").dataset.state = running ? "running" : "done";
}

function request() {
  const body = {
    prompt: $("prompt").value,
    max_tokens: +$("max_tokens").value,
    temperature: +$("temperature").value,
    top_p: +$("top_p").value,
    top_k: +$("top_k").value,
    repetition_penalty: +$("repetition_penalty").value,
    stream: true,
    stream_options: { include_usage: true, continuous_usage_stats: true },
  };
  const stop = $("stop_strings").value.split("\n").filter((s) => s.length).map(unescape);
  if (stop.length) body.stop = stop.slice(0, 4);
  if ($("seed").value !== "") body.seed = parseInt($("seed").value, 10);
  if (modelName) body.model = modelName;
  return body;
}

function showStats(tokens, t0, tFirst, tLast, finish) {
  const parts = [`${tokens} tokens`];
  if (tokens > 1 && tLast > tFirst) parts.push(`${((tokens - 1) / ((tLast - tFirst) / 1000)).toFixed(1)} tok/s`);
  else if (tokens > 0) parts.push(`${(tokens / ((tLast - t0) / 1000)).toFixed(1)} tok/s`);
  if (tFirst) parts.push(`first token ${Math.round(tFirst - t0)} ms`);
  if (finish) parts.push(REASONS[finish] || finish);
  $("stats").textContent = parts.join(" · ");
}

async function generate() {
  if (controller) return;
  $("error").hidden = true;
  const out = $("output");
  out.textContent = "";
  out.dataset.chunks = "0";
  const echo = document.createElement("span");
  echo.className = "prompt-echo";
  echo.textContent = $("prompt").value;
  const completion = document.createElement("span");
  completion.className = "completion";
  out.append(echo, completion);
  controller = new AbortController();
  setRunning(true);
  const t0 = performance.now();
  let tFirst = 0, tLast = 0, tokens = 0, finish = null, chunks = 0;
  $("stats").textContent = "waiting…";
  try {
    const resp = await fetch("/v1/completions", {
      method: "POST", headers: apiHeaders(), body: JSON.stringify(request()), signal: controller.signal,
    });
    if (!resp.ok) {
      let message = `HTTP ${resp.status}`;
      try { message = (await resp.json()).error.message; } catch (e) { /* not JSON */ }
      throw new Error(message);
    }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const msg = JSON.parse(data);
          if (msg.error) throw new Error(msg.error.message);
          const now = performance.now();
          if (msg.usage) tokens = msg.usage.completion_tokens;
          for (const choice of msg.choices) {
            if (choice.text) {
              if (!tFirst) tFirst = now;
              completion.textContent += choice.text;
              out.dataset.chunks = String(++chunks);
            }
            if (choice.finish_reason) finish = choice.finish_reason;
          }
          tLast = now;
          showStats(tokens, t0, tFirst, tLast, finish);
        }
      }
    }
  } catch (e) {
    if (e.name === "AbortError") finish = "user";
    else showError(e.message);
  } finally {
    controller = null;
    setRunning(false);
    if (tokens) showStats(tokens, t0, tFirst, tLast, finish);
  }
}

for (const id of sliders) $(id).addEventListener("input", showValues);
$("generate").addEventListener("click", generate);
$("stop").addEventListener("click", () => controller && controller.abort());
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); generate(); }
});
showValues();
loadHealth();
