// The chat page: saved conversations in the sidebar, a reply streamed from /v1/chat/completions, Stop,
// sampling settings, and Compare (the base model and a tuned one answering side by side).
// Text from people and models goes into the page with textContent only, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const SETTINGS_ITEM = "kiln.chatSettings";
const MODEL_ITEM = "kiln.model";
const CONVERSATION_ITEM = "kiln.conversation";
const DEFAULT_TITLE = "New chat";
const TITLE_LENGTH = 60;

const state = {
  conversation: null, // {id, title, messages: [...]} as the store answers it, or null for a new chat
  models: [], // the entries of GET /v1/models
  controller: null, // the AbortController of the replies streaming now
};

// --- status line ---------------------------------------------------------------------------------

function showStatus(message, isError = false) {
  const status = $("status");
  status.textContent = message;
  status.classList.toggle("error", isError);
  status.hidden = !message;
}

function explain(error) {
  if (error.status === 401) return `${error.message}. Enter the server's key in "API key".`;
  return error.message || String(error);
}

// --- settings --------------------------------------------------------------------------------------

function loadSettings() {
  let saved = {};
  try {
    saved = JSON.parse(localStorage.getItem(SETTINGS_ITEM) || "{}");
  } catch (ignored) {
    // a damaged entry: start from the page's defaults
  }
  for (const [id, value] of Object.entries(saved)) {
    const input = $(id);
    if (!input) continue;
    if (input.type === "checkbox") input.checked = Boolean(value);
    else input.value = value;
  }
  $("api-key").value = Kiln.apiKey();
}

function saveSettings() {
  const saved = {
    temperature: $("temperature").value,
    "top-p": $("top-p").value,
    "max-tokens": $("max-tokens").value,
    "known-words": $("known-words").checked,
    compare: $("compare").checked,
  };
  localStorage.setItem(SETTINGS_ITEM, JSON.stringify(saved));
}

function sampling() {
  const number = (id, fallback) => {
    const value = Number($(id).value);
    return $(id).value !== "" && Number.isFinite(value) ? value : fallback;
  };
  return {
    temperature: number("temperature", 0.8),
    top_p: number("top-p", 1),
    max_tokens: Math.round(number("max-tokens", 200)),
    known_words: $("known-words").checked,
  };
}

// --- models ------------------------------------------------------------------------------------------

// The base to compare `modelId` with: the one it names as its kiln_base, else the server's first base.
function baseModel(modelId) {
  const tuned = state.models.find((model) => model.id === modelId);
  const own = tuned && tuned.kiln_base && state.models.find((model) => model.id === tuned.kiln_base);
  return own || state.models.find((model) => model.kiln_role === "base") || null;
}

function roleOf(modelId) {
  const found = state.models.find((model) => model.id === modelId);
  return found ? found.kiln_role : null;
}

async function loadModels(wanted) {
  const select = $("model");
  try {
    state.models = (await Kiln.json("/v1/models")).data || [];
  } catch (error) {
    state.models = [];
    showStatus(`Could not list the models: ${explain(error)}`, true);
  }
  select.replaceChildren();
  for (const model of state.models) {
    const option = document.createElement("option");
    option.value = model.id;
    option.textContent = model.kiln_role ? `${model.id} (${model.kiln_role})` : model.id;
    select.append(option);
  }
  const ids = state.models.map((model) => model.id);
  const choice = [wanted, localStorage.getItem(MODEL_ITEM)].find((id) => id && ids.includes(id));
  if (choice) select.value = choice;
  else if (wanted) showStatus(`The server does not serve the model "${wanted}".`, true);
}

// --- conversations -----------------------------------------------------------------------------------

async function refreshList() {
  let conversations;
  try {
    conversations = (await Kiln.json("/api/conversations")).data;
  } catch (error) {
    showStatus(`Could not load the saved conversations: ${explain(error)}`, true);
    return;
  }
  const list = $("conversations");
  list.replaceChildren(...conversations.map(conversationItem));
}

function iconButton(label, symbol, onClick) {
  const button = document.createElement("button");
  button.type = "button";
  button.textContent = symbol;
  button.title = label;
  button.setAttribute("aria-label", label);
  button.addEventListener("click", onClick);
  return button;
}

function conversationItem(conversation) {
  const item = document.createElement("li");
  item.className = "conversation";
  item.dataset.id = conversation.id;
  item.classList.toggle("active", state.conversation !== null && state.conversation.id === conversation.id);
  const open = document.createElement("button");
  open.type = "button";
  open.className = "open";
  open.textContent = conversation.title;
  open.title = conversation.title;
  open.addEventListener("click", () => openConversation(conversation.id));
  const actions = document.createElement("span");
  actions.className = "actions";
  actions.append(
    iconButton("Rename", "\u270E", () => startRename(item, open, conversation)),
    iconButton("Export as JSON", "\u2913", () => exportConversation(conversation.id)),
    iconButton("Delete", "\u2715", () => deleteConversation(conversation)),
  );
  item.append(open, actions);
  return item;
}

function startRename(item, open, conversation) {
  const input = document.createElement("input");
  input.value = conversation.title;
  input.maxLength = 200;
  input.setAttribute("aria-label", "New title");
  let done = false;
  const finish = async (save) => {
    if (done) return;
    done = true;
    const title = input.value.trim();
    if (save && title && title !== conversation.title) {
      try {
        await Kiln.json(`/api/conversations/${conversation.id}`, { method: "PATCH", body: { title } });
        if (state.conversation && state.conversation.id === conversation.id) state.conversation.title = title;
      } catch (error) {
        showStatus(`Could not rename: ${explain(error)}`, true);
      }
    }
    await refreshList();
  };
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter") finish(true);
    if (event.key === "Escape") finish(false);
  });
  input.addEventListener("blur", () => finish(true));
  open.replaceWith(input);
  item.querySelector(".actions").hidden = true;
  input.focus();
  input.select();
}

async function exportConversation(id) {
  try {
    const response = await Kiln.request(`/api/conversations/${id}/export`);
    if (!response.ok) throw new Kiln.HTTPError(await Kiln.errorMessage(response), response.status);
    const disposition = response.headers.get("Content-Disposition") || "";
    const named = /filename="([^"]+)"/.exec(disposition);
    const link = document.createElement("a");
    link.href = URL.createObjectURL(await response.blob());
    link.download = named ? named[1] : `kiln-conversation-${id}.json`;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  } catch (error) {
    showStatus(`Could not export: ${explain(error)}`, true);
  }
}

async function deleteConversation(conversation) {
  if (!confirm(`Delete "${conversation.title}" and its messages?`)) return;
  try {
    await Kiln.json(`/api/conversations/${conversation.id}`, { method: "DELETE" });
  } catch (error) {
    showStatus(`Could not delete: ${explain(error)}`, true);
    return;
  }
  if (state.conversation && state.conversation.id === conversation.id) startNewChat();
  await refreshList();
}

function remember(id) {
  if (id) {
    localStorage.setItem(CONVERSATION_ITEM, id);
    history.replaceState(null, "", `${location.pathname}#${id}`);
  } else {
    localStorage.removeItem(CONVERSATION_ITEM);
    history.replaceState(null, "", location.pathname);
  }
}

async function openConversation(id) {
  if (state.controller) return; // a reply is streaming into the open conversation
  try {
    state.conversation = await Kiln.json(`/api/conversations/${encodeURIComponent(id)}`);
  } catch (error) {
    if (error.status === 404) {
      startNewChat();
    } else {
      showStatus(`Could not open the conversation: ${explain(error)}`, true);
    }
    return;
  }
  remember(state.conversation.id);
  renderMessages();
  for (const item of $("conversations").children) item.classList.toggle("active", item.dataset.id === id);
}

function startNewChat() {
  if (state.controller) return;
  state.conversation = null;
  remember(null);
  renderMessages();
  for (const item of $("conversations").children) item.classList.remove("active");
  $("prompt").focus();
}

// --- messages ----------------------------------------------------------------------------------------

// A model's name, with its role (base, adapter, tuned) when the name does not already say it.
function modelLabel(modelId) {
  const role = roleOf(modelId);
  return role && role !== modelId ? `${modelId} \u00B7 ${role}` : modelId;
}

function bubble(role, model, content) {
  const message = document.createElement("div");
  message.className = `message ${role}`;
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.textContent = role === "assistant" && model ? modelLabel(model) : role;
  const text = document.createElement("div");
  text.className = "content";
  text.textContent = content;
  message.append(meta, text);
  return message;
}

// The replies of one turn share a row: one reply, or two side by side in Compare mode.
function repliesRow(count) {
  const row = document.createElement("div");
  row.className = count > 1 ? "replies compare" : "replies";
  $("messages").append(row);
  return row;
}

function renderMessages() {
  const box = $("messages");
  box.replaceChildren();
  const messages = state.conversation ? state.conversation.messages : [];
  if (messages.length === 0) {
    const hint = document.createElement("p");
    hint.id = "empty";
    hint.className = "hint";
    hint.textContent = "Ask something to start a conversation. It is saved on the server.";
    box.append(hint);
  }
  for (let i = 0; i < messages.length; ) {
    if (messages[i].role !== "assistant") {
      box.append(bubble(messages[i].role, messages[i].model, messages[i].content));
      i += 1;
      continue;
    }
    let end = i;
    while (end < messages.length && messages[end].role === "assistant") end += 1;
    const row = repliesRow(end - i);
    for (const message of messages.slice(i, end)) row.append(bubble("assistant", message.model, message.content));
    i = end;
  }
  scrollToEnd();
}

function scrollToEnd() {
  const box = $("messages");
  box.scrollTop = box.scrollHeight;
}

// What `model` is told of the conversation: every system and user message, and of each turn's replies
// its own (a Compare turn holds two), else the turn's first.
function historyFor(messages, model) {
  const history = [];
  for (let i = 0; i < messages.length; ) {
    if (messages[i].role !== "assistant") {
      history.push({ role: messages[i].role, content: messages[i].content });
      i += 1;
      continue;
    }
    let end = i;
    while (end < messages.length && messages[end].role === "assistant") end += 1;
    const replies = messages.slice(i, end);
    const chosen = replies.find((reply) => reply.model === model) || replies[0];
    history.push({ role: "assistant", content: chosen.content });
    i = end;
  }
  return history;
}

// --- streaming -------------------------------------------------------------------------------------

// Streams one reply into `target` (a .content element). Answers {text, stopped}; throws on an error reply,
// with what had arrived as error.partial.
async function streamReply(model, messages, target, signal) {
  let text = "";
  try {
    const response = await Kiln.request("/v1/chat/completions", {
      method: "POST",
      // truncate_history (Kiln's): a conversation longer than a small model's context drops its oldest turns.
      body: { model, messages, stream: true, truncate_history: true, ...sampling() },
      signal,
    });
    if (!response.ok) throw new Kiln.HTTPError(await Kiln.errorMessage(response), response.status);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let newline;
      while ((newline = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, newline).replace(/\r$/, "");
        buffer = buffer.slice(newline + 1);
        if (!line.startsWith("data:")) continue; // blank separators and SSE comments
        const data = line.slice(5).trim();
        if (data === "[DONE]") return { text, stopped: false };
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
        const choice = chunk.choices && chunk.choices[0];
        const piece = choice && choice.delta && choice.delta.content;
        if (piece) {
          text += piece;
          target.textContent = text;
          scrollToEnd();
        }
      }
    }
    return { text, stopped: false };
  } catch (error) {
    if (error.name === "AbortError") return { text, stopped: true };
    error.partial = text;
    throw error;
  }
}

// The models that answer this turn: the selected one, and in Compare mode the base beside it.
function answeringModels() {
  const selected = $("model").value;
  if (!selected) throw new Error("No model to ask: the server lists none.");
  if (!$("compare").checked) return [selected];
  const base = baseModel(selected);
  if (!base) throw new Error("Compare needs a base model, and the server lists none.");
  if (selected === base.id) throw new Error("To compare, pick a tuned model (adapter or tuned) in Model.");
  return [base.id, selected];
}

async function ensureConversation(firstMessage) {
  if (state.conversation) {
    if (state.conversation.messages.length === 0 && state.conversation.title === DEFAULT_TITLE) {
      const title = titleFrom(firstMessage);
      await Kiln.json(`/api/conversations/${state.conversation.id}`, { method: "PATCH", body: { title } });
      state.conversation.title = title;
    }
    return state.conversation;
  }
  const created = await Kiln.json("/api/conversations", {
    method: "POST",
    body: { title: titleFrom(firstMessage), model: $("model").value || null },
  });
  state.conversation = { ...created, messages: [] };
  remember(created.id);
  return state.conversation;
}

function titleFrom(text) {
  const line = text.replace(/\s+/g, " ").trim();
  return line.length > TITLE_LENGTH ? line.slice(0, TITLE_LENGTH - 1) + "\u2026" : line || DEFAULT_TITLE;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("new-chat").disabled = busy;
}

async function send() {
  const text = $("prompt").value;
  if (!text.trim() || state.controller) return;
  let models;
  try {
    models = answeringModels();
  } catch (error) {
    showStatus(error.message, true);
    return;
  }
  showStatus("");
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  try {
    const conversation = await ensureConversation(text);
    const saved = await Kiln.json(`/api/conversations/${conversation.id}/messages`, {
      method: "POST",
      body: { role: "user", content: text },
    });
    conversation.messages.push(saved);
    $("prompt").value = "";
    renderMessages();
    await refreshList();
    const row = repliesRow(models.length);
    const replies = models.map((model) => {
      const reply = bubble("assistant", model, "");
      reply.classList.add("streaming");
      row.append(reply);
      const history = historyFor(conversation.messages, model);
      return answer(conversation, model, history, reply, controller.signal);
    });
    // Saved in the order shown, so that a reload draws the same columns.
    const results = await Promise.all(replies);
    for (const result of results) {
      if (result) conversation.messages.push(await saveReply(conversation, result));
    }
  } catch (error) {
    showStatus(explain(error), true);
  } finally {
    state.controller = null;
    setBusy(false);
    await refreshList();
    $("prompt").focus();
  }
}

// One model's reply streamed into its bubble; answers what to save ({model, text}) or null when nothing came.
async function answer(conversation, model, history, reply, signal) {
  const target = reply.querySelector(".content");
  try {
    const { text, stopped } = await streamReply(model, history, target, signal);
    if (stopped) reply.querySelector(".meta").textContent += " \u00B7 stopped";
    return text ? { model, text } : null;
  } catch (error) {
    reply.classList.add("error");
    target.textContent = (error.partial ? error.partial + "\n\n" : "") + `Error: ${explain(error)}`;
    return null;
  } finally {
    reply.classList.remove("streaming");
  }
}

function saveReply(conversation, result) {
  return Kiln.json(`/api/conversations/${conversation.id}/messages`, {
    method: "POST",
    body: { role: "assistant", content: result.text, model: result.model },
  });
}

// --- start ---------------------------------------------------------------------------------------------

async function start() {
  loadSettings();
  const params = new URLSearchParams(location.search);
  const wanted = params.get("model");
  await loadModels(wanted);
  await refreshList();
  if (wanted) {
    // Coming from the runs page: a new chat with that model (the query is dropped, so a reload reopens it).
    localStorage.setItem(MODEL_ITEM, $("model").value);
    startNewChat();
  } else {
    const id = location.hash.slice(1) || localStorage.getItem(CONVERSATION_ITEM);
    if (id) await openConversation(id);
  }

  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("new-chat").addEventListener("click", startNewChat);
  $("model").addEventListener("change", () => localStorage.setItem(MODEL_ITEM, $("model").value));
  for (const id of ["temperature", "top-p", "max-tokens", "known-words", "compare"]) {
    $(id).addEventListener("change", saveSettings);
  }
  $("api-key").addEventListener("change", async () => {
    Kiln.setApiKey($("api-key").value.trim());
    showStatus("");
    await loadModels(null);
    await refreshList();
    const id = location.hash.slice(1) || localStorage.getItem(CONVERSATION_ITEM);
    if (id && !state.conversation) await openConversation(id);
  });
  window.addEventListener("hashchange", () => {
    const id = location.hash.slice(1);
    if (id && (!state.conversation || state.conversation.id !== id)) openConversation(id);
  });
  document.body.dataset.ready = "true"; // for tests and scripts: the page has loaded its data
}

start();
