// pilelm playground: streams POST /v1/completions and /v1/chat/completions (server-sent
// events) into the page, each token coloured by its probability under the model (from the
// API's logprobs; the prompt's own tokens too, through echo). Hover a token for its value.
// No dependencies and no external resources, so it works on an offline machine.
"use strict";

const $ = (id) => document.getElementById(id);
const sliders = ["max_tokens", "temperature", "top_p", "top_k", "repetition_penalty"];
const REASONS = { length: "hit max tokens", stop: "end of text or stop sequence", user: "stopped by you" };
let controller = null;
let modelName = null;
let chatHistory = [];

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

function samplingBody() {
  const body = {
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

function statsText(tokens, t0, tFirst, tLast, finish) {
  const parts = [`${tokens} tokens`];
  if (tokens > 1 && tLast > tFirst) parts.push(`${((tokens - 1) / ((tLast - tFirst) / 1000)).toFixed(1)} tok/s`);
  else if (tokens > 0) parts.push(`${(tokens / ((tLast - t0) / 1000)).toFixed(1)} tok/s`);
  if (tFirst) parts.push(`first token ${Math.round(tFirst - t0)} ms`);
  if (finish) parts.push(REASONS[finish] || finish);
  return parts.join(" · ");
}

// --- tokens coloured by probability ------------------------------------------------------

// p = 0 red, p = 1 green; the hue scale is the probability, so surprise stands out.
function tokenSpan(text, token, logprob) {
  const span = document.createElement("span");
  span.className = "tok";
  span.textContent = text;
  if (logprob === null || logprob === undefined) {
    span.title = `${JSON.stringify(token)}: the first token has no context, so no probability`;
    return span;
  }
  const p = Math.exp(logprob);
  span.dataset.p = p.toFixed(4);
  span.dataset.logprob = logprob.toFixed(4);
  span.style.backgroundColor = `hsla(${Math.round(120 * p)}, 85%, 50%, 0.30)`;
  span.title = `${JSON.stringify(token)}: p = ${p.toFixed(3)} (logprob ${logprob.toFixed(3)})`;
  return span;
}

// Append a chunk's text to `target`, cut into one span per token. Completions logprobs give
// tokens and where each starts (text_offset); the first token of a chunk takes any text held
// back before it (a character or stop-string prefix that earlier tokens began).
function appendCompletionTokens(target, text, logprobs, base) {
  if (!logprobs || !logprobs.tokens.length) {
    if (text) target.append(document.createTextNode(text));
    return;
  }
  const n = logprobs.tokens.length;
  for (let i = 0; i < n; i++) {
    const start = i === 0 ? 0 : Math.max(0, logprobs.text_offset[i] - base);
    const end = i + 1 < n ? Math.max(start, logprobs.text_offset[i + 1] - base) : text.length;
    target.append(tokenSpan(text.slice(start, end), logprobs.tokens[i], logprobs.token_logprobs[i]));
  }
}

function appendChatTokens(target, text, logprobs) {
  const items = logprobs && logprobs.content;
  if (!items || !items.length) {
    if (text) target.append(document.createTextNode(text));
    return;
  }
  items.forEach((item, i) => target.append(tokenSpan(i === 0 ? text : "", item.token, item.logprob)));
}

function showTokenInfo(e) {
  const span = e.target.closest && e.target.closest(".tok");
  if (span) $("token_info").textContent = span.title;
}

// --- streaming ---------------------------------------------------------------------------

// POST `body` to `url` and call onMessage(msg) for every server-sent JSON event.
async function postStream(url, body, signal, onMessage) {
  const resp = await fetch(url, { method: "POST", headers: apiHeaders(), body: JSON.stringify(body), signal });
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
        onMessage(msg);
      }
    }
  }
}

// Runs one streaming request with the shared Stop button state, stats line and errors.
async function run(kind, url, body, onChoice) {
  if (controller) return;
  $("error").hidden = true;
  const ids = kind === "chat" ? { go: "chat_send", stop: "chat_stop", stats: "chat_stats", box: "chat_log" }
                              : { go: "generate", stop: "stop", stats: "stats", box: "output" };
  controller = new AbortController();
  $(ids.go).disabled = true;
  $(ids.stop).disabled = false;
  $(ids.box).dataset.state = "running";
  const t0 = performance.now();
  let tFirst = 0, tLast = 0, tokens = 0, finish = null;
  $(ids.stats).textContent = "waiting…";
  try {
    await postStream(url, body, controller.signal, (msg) => {
      const now = performance.now();
      if (msg.usage) tokens = msg.usage.completion_tokens;
      for (const choice of msg.choices) {
        if (onChoice(choice) && !tFirst) tFirst = now;
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      tLast = now;
      $(ids.stats).textContent = statsText(tokens, t0, tFirst, tLast, finish);
    });
  } catch (e) {
    if (e.name === "AbortError") finish = "user";
    else showError(e.message);
  } finally {
    controller = null;
    $(ids.go).disabled = false;
    $(ids.stop).disabled = true;
    $(ids.box).dataset.state = "done";
    if (tokens) $(ids.stats).textContent = statsText(tokens, t0, tFirst, tLast, finish);
  }
  return finish;
}

// --- complete tab ------------------------------------------------------------------------

async function generate() {
  if (controller) return;
  const out = $("output");
  out.textContent = "";
  out.dataset.chunks = "0";
  const echo = document.createElement("span");
  echo.className = "prompt-echo";
  const completion = document.createElement("span");
  completion.className = "completion";
  out.append(echo, completion);
  const probs = $("show_probs").checked;
  const body = { prompt: $("prompt").value, ...samplingBody() };
  if (probs) Object.assign(body, { logprobs: 1, echo: true });
  else echo.textContent = $("prompt").value;
  let chunks = 0, chars = 0, echoed = !probs;
  await run("complete", "/v1/completions", body, (choice) => {
    if (!echoed) {  // with echo the first chunk is the prompt, its tokens scored
      echoed = true;
      appendCompletionTokens(echo, choice.text, choice.logprobs, 0);
      chars += choice.text.length;
      return false;
    }
    if (!choice.text && !(choice.logprobs && choice.logprobs.tokens.length)) return false;
    appendCompletionTokens(completion, choice.text, choice.logprobs, chars);
    chars += choice.text.length;
    out.dataset.chunks = String(++chunks);
    return true;
  });
}

// --- chat tab ----------------------------------------------------------------------------

function chatMessage(role, text) {
  const log = $("chat_log");
  if (!chatHistory.length) log.textContent = "";
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  div.append(label, body);
  log.append(div);
  return body;
}

async function sendChat() {
  const content = $("chat_input").value;
  if (controller || !content.trim()) return;
  chatMessage("user", content);
  chatHistory.push({ role: "user", content });
  $("chat_input").value = "";
  const reply = chatMessage("assistant", "");
  const system = $("chat_system").value.trim();
  const messages = system ? [{ role: "system", content: system }, ...chatHistory] : chatHistory;
  const body = { messages, ...samplingBody() };
  if ($("show_probs").checked) body.logprobs = true;
  let text = "";
  await run("chat", "/v1/chat/completions", body, (choice) => {
    const delta = choice.delta || {};
    if (!delta.content && !(choice.logprobs && choice.logprobs.content)) return false;
    appendChatTokens(reply, delta.content || "", choice.logprobs);
    text += delta.content || "";
    return true;
  });
  chatHistory.push({ role: "assistant", content: text });
  $("chat_log").dataset.turns = String(chatHistory.length / 2);
}

function clearChat() {
  if (controller) return;
  chatHistory = [];
  $("chat_log").textContent = "";
  $("chat_log").dataset.turns = "0";
  $("chat_stats").textContent = "";
}

function selectTab(name) {
  for (const tab of ["complete", "chat"]) {
    $("tab_" + tab).setAttribute("aria-selected", String(tab === name));
    $("panel_" + tab).hidden = tab !== name;
  }
}

for (const id of sliders) $(id).addEventListener("input", showValues);
$("generate").addEventListener("click", generate);
$("chat_send").addEventListener("click", sendChat);
$("chat_clear").addEventListener("click", clearChat);
for (const id of ["stop", "chat_stop"]) $(id).addEventListener("click", () => controller && controller.abort());
$("tab_complete").addEventListener("click", () => selectTab("complete"));
$("tab_chat").addEventListener("click", () => selectTab("chat"));
for (const id of ["output", "chat_log"]) $(id).addEventListener("mouseover", showTokenInfo);
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); generate(); }
});
$("chat_input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); sendChat(); }
});
showValues();
loadHealth();
