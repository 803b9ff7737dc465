// Shared by the chat and runs pages: the API key (kept in localStorage, sent as a Bearer token on
// every request) and fetch helpers that turn OpenAI-shaped error bodies into readable messages.
"use strict";

const Kiln = (() => {
  const KEY_ITEM = "kiln.apiKey";

  function apiKey() {
    return localStorage.getItem(KEY_ITEM) || "";
  }

  function setApiKey(key) {
    if (key) localStorage.setItem(KEY_ITEM, key);
    else localStorage.removeItem(KEY_ITEM);
  }

  // fetch with the key attached; a plain-object body is sent as JSON. Answers the Response whatever its status.
  function request(path, options = {}) {
    const headers = new Headers(options.headers || {});
    const key = apiKey();
    if (key) headers.set("Authorization", "Bearer " + key);
    let body = options.body;
    if (body !== undefined && typeof body !== "string") {
      headers.set("Content-Type", "application/json");
      body = JSON.stringify(body);
    }
    return fetch(path, { ...options, headers, body });
  }

  // The message of an error reply: {"error": {"message": ...}} from Kiln and OpenAI, else the status line.
  async function errorMessage(response) {
    const text = await response.text();
    try {
      const parsed = JSON.parse(text);
      const message = parsed && parsed.error && (parsed.error.message || parsed.error);
      if (message) return `${message} (HTTP ${response.status})`;
      if (parsed && parsed.detail) return `${JSON.stringify(parsed.detail)} (HTTP ${response.status})`;
    } catch (ignored) {
      // not JSON: fall through to the status line
    }
    return `HTTP ${response.status} ${response.statusText || text.slice(0, 200)}`.trim();
  }

  class HTTPError extends Error {
    constructor(message, status) {
      super(message);
      this.status = status;
    }
  }

  // request(), then the parsed JSON body; an error status throws HTTPError with the server's message.
  async function json(path, options = {}) {
    const response = await request(path, options);
    if (!response.ok) throw new HTTPError(await errorMessage(response), response.status);
    return response.json();
  }

  return { apiKey, setApiKey, request, errorMessage, json, HTTPError };
})();
