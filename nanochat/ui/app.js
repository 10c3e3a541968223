// nanochat web chat (docs/serving.md). Vanilla JS, no build step, no network beyond this server.
// Model output is only ever put on the page through textContent / createElement (no HTML parsing).
"use strict";

const API_URL = ""; // same origin
const state = {
  messages: [],          // {role: "user"|"assistant", content: string | [{type, text}]}
  temperature: 0.8,
  topK: 50,
  maxTokens: 512,
  apiKey: localStorage.getItem("nanochat_api_key") || "",
  generating: false,
  controller: null,
};

const el = {
  messages: document.getElementById("messages"),
  chat: document.getElementById("chat"),
  input: document.getElementById("input"),
  send: document.getElementById("send"),
  form: document.getElementById("composer"),
  banner: document.getElementById("banner"),
  modelName: document.getElementById("model-name"),
  newChat: document.getElementById("new-chat"),
};

function headers() {
  const h = {"Content-Type": "application/json"};
  if (state.apiKey) h["Authorization"] = "Bearer " + state.apiKey;
  return h;
}

// --- rendering -------------------------------------------------------------------------

function make(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// Plain text with ``` fenced code blocks as <pre><code> (an unclosed fence, as while streaming, runs to the end).
function renderText(container, text) {
  const fence = /```([^\n`]*)\n?([\s\S]*?)(```|$)/g;
  let last = 0, m;
  while ((m = fence.exec(text)) !== null) {
    if (m.index > last) container.appendChild(document.createTextNode(text.slice(last, m.index)));
    const pre = make("pre");
    if (m[1].trim()) pre.appendChild(make("span", "code-lang", m[1].trim()));
    pre.appendChild(make("code", null, m[2]));
    container.appendChild(pre);
    last = fence.lastIndex;
    if (m[0].length === 0) break;
  }
  if (last < text.length) container.appendChild(document.createTextNode(text.slice(last)));
}

function renderParts(container, parts) {
  container.replaceChildren();
  for (const part of parts) {
    if (part.type === "python") {
      const box = make("span", "tool-call");
      box.appendChild(make("span", "tool-label", "python"));
      box.appendChild(make("code", null, part.text));
      container.appendChild(box);
    } else if (part.type === "python_output") {
      const box = make("span", "tool-result");
      box.appendChild(make("span", "tool-label", "result"));
      box.appendChild(make("code", null, part.text));
      container.appendChild(box);
    } else {
      renderText(container, part.text);
    }
  }
}

function asParts(content) {
  return typeof content === "string" ? [{type: "text", text: content}] : content;
}

function scrollDown() { el.chat.scrollTop = el.chat.scrollHeight; }

function messageNode(msg, index) {
  const node = make("div", "message " + msg.role);
  node.dataset.index = String(index);
  if (msg.role === "user") {
    node.textContent = msg.content;
    node.title = "Click to edit and resend";
    node.addEventListener("click", () => editMessage(index));
  } else {
    renderParts(node, asParts(msg.content));
    node.title = "Click to regenerate";
    node.addEventListener("click", () => regenerate(index));
  }
  return node;
}

function renderAll() {
  el.messages.replaceChildren(...state.messages.map(messageNode));
  scrollDown();
}

function addNote(text, kind = "console") {
  el.messages.appendChild(make("div", "message " + kind, text));
  scrollDown();
}

// --- conversation actions --------------------------------------------------------------

function editMessage(index) {
  if (state.generating) return;
  el.input.value = state.messages[index].content;
  state.messages.splice(index);
  renderAll();
  updateInput();
  el.input.focus();
}

function regenerate(index) {
  if (state.generating) return;
  state.messages.splice(index);
  renderAll();
  generate();
}

function newConversation() {
  if (state.controller) state.controller.abort();
  state.messages = [];
  el.messages.replaceChildren();
  el.input.value = "";
  updateInput();
  el.input.focus();
}

// A message as the server takes it: a string, or text/python/python_output parts when the reply used the tool.
function toWire(msg) {
  const parts = asParts(msg.content);
  if (parts.every(p => p.type === "text")) return {role: msg.role, content: parts.map(p => p.text).join("")};
  return {role: msg.role, content: parts};
}

async function generate() {
  state.generating = true;
  updateInput();
  const node = make("div", "message assistant streaming typing");
  el.messages.appendChild(node);
  scrollDown();
  const parts = [];
  const controller = new AbortController();
  state.controller = controller;
  let failed = null;
  try {
    const response = await fetch(API_URL + "/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({messages: state.messages.map(toWire), temperature: state.temperature,
                            top_k: state.topK, max_tokens: state.maxTokens}),
    });
    if (!response.ok) {
      let message = "HTTP " + response.status;
      try { message = (await response.json()).error.message; } catch (e) { /* not JSON */ }
      if (response.status === 401) message += " Set it with /key <key>.";
      throw new Error(message);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {done, value} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      const lines = buffer.split("\n");
      buffer = lines.pop();
      for (const line of lines) {
        if (!line.startsWith("data: ")) continue;
        const event = JSON.parse(line.slice(6));
        if (event.error) failed = typeof event.error === "string" ? event.error : event.error.message;
        if (typeof event.token === "string") {
          const type = event.part || "text";
          const lastPart = parts[parts.length - 1];
          if (lastPart && lastPart.type === type) lastPart.text += event.token;
          else parts.push({type, text: event.token});
          node.classList.remove("typing");
          renderParts(node, parts);
          scrollDown();
        }
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") failed = e.message;
  } finally {
    state.generating = false;
    state.controller = null;
  }
  if (controller.signal.aborted) { node.remove(); updateInput(); return; }
  if (failed !== null && parts.length === 0) {
    // nothing came back: take the unanswered message back into the input so Enter retries it
    node.remove();
    const last = state.messages[state.messages.length - 1];
    if (last && last.role === "user") {
      state.messages.pop();
      if (!el.input.value) el.input.value = last.content;
    }
    renderAll();
    addNote("Error: " + failed, "error");
  } else {
    state.messages.push({role: "assistant", content: parts.length ? parts : ""});
    if (failed !== null) addNote("Error: " + failed, "error");
    renderAll();
  }
  updateInput();
  el.input.focus();
}

// --- slash commands (shown as console notes, never sent) --------------------------------

const HELP = () => [
  "/temperature [v]  show or set the temperature (0-2), now " + state.temperature,
  "/topk [v]         show or set top-k (0-200, 0 = off), now " + state.topK,
  "/maxtokens [v]    show or set the reply length limit (1-4096), now " + state.maxTokens,
  "/key [k]          set the API key for servers started with --api-key (no value clears it)",
  "/clear            start a new conversation (also Ctrl+Shift+N)",
  "/help             this list",
  "Click your message to edit and resend it; click a reply to regenerate it.",
].join("\n");

function setNumber(name, key, value, lo, hi, integer) {
  if (value === undefined) { addNote(`${name} = ${state[key]}`); return; }
  const v = Number(value);
  if (!Number.isFinite(v) || v < lo || v > hi || (integer && !Number.isInteger(v))) {
    addNote(`${name} must be ${integer ? "an integer " : ""}between ${lo} and ${hi}`, "error");
    return;
  }
  state[key] = v;
  addNote(`${name} set to ${v}`);
}

function command(text) {
  const [cmd, value] = text.trim().split(/\s+/, 2);
  switch (cmd) {
    case "/temperature": setNumber("temperature", "temperature", value, 0, 2, false); break;
    case "/topk": setNumber("top-k", "topK", value, 0, 200, true); break;
    case "/maxtokens": setNumber("max tokens", "maxTokens", value, 1, 4096, true); break;
    case "/key":
      state.apiKey = value || "";
      if (state.apiKey) localStorage.setItem("nanochat_api_key", state.apiKey);
      else localStorage.removeItem("nanochat_api_key");
      addNote(state.apiKey ? "API key set" : "API key cleared");
      checkHealth();
      break;
    case "/clear": newConversation(); break;
    case "/help": addNote(HELP()); break;
    default: addNote(`unknown command ${cmd}; /help lists them`, "error");
  }
}

// --- input -----------------------------------------------------------------------------

function updateInput() {
  el.input.style.height = "auto";
  el.input.style.height = Math.min(el.input.scrollHeight, 200) + "px";
  el.send.disabled = state.generating || el.input.value.trim() === "";
}

function submit() {
  const text = el.input.value.trim();
  if (!text || state.generating) return;
  el.input.value = "";
  updateInput();
  if (text.startsWith("/")) { command(text); return; }
  state.messages.push({role: "user", content: text});
  renderAll();
  generate();
}

el.form.addEventListener("submit", e => { e.preventDefault(); submit(); });
el.input.addEventListener("input", updateInput);
el.input.addEventListener("keydown", e => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); submit(); }
});
el.newChat.addEventListener("click", newConversation);
document.addEventListener("keydown", e => {
  if (e.ctrlKey && e.shiftKey && (e.key === "N" || e.key === "n")) { e.preventDefault(); newConversation(); }
});

// --- health ------------------------------------------------------------------------------

async function checkHealth() {
  try {
    const response = await fetch(API_URL + "/health");
    const health = await response.json();
    if (!response.ok || health.status !== "ok") throw new Error(health.status || response.status);
    el.banner.hidden = true;
    el.modelName.textContent = health.model || "";
  } catch (e) {
    el.banner.textContent = "Engine not running";
    el.banner.hidden = false;
  }
}

checkHealth();
setInterval(checkHealth, 15000);
updateInput();
