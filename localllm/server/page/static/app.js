// localllm's chat page: talks to this server's OpenAI-compatible API exactly as any client does
// (the same routes, the same Bearer key), keeps conversations in this browser's localStorage.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const STORE = { conversations: "localllm.conversations", settings: "localllm.settings", current: "localllm.current" };

  const els = {
    sidebar: $("sidebar"), toggleSidebar: $("toggle-sidebar"), newChat: $("new-chat"), exportAll: $("export"),
    list: $("conversations"), noConversations: $("no-conversations"),
    model: $("model"), modelInfo: $("model-info"), load: $("load-model"), unload: $("unload-model"),
    toggleSettings: $("toggle-settings"), settings: $("settings"), system: $("system-prompt"),
    temperature: $("temperature"), maxTokens: $("max-tokens"), apiKey: $("api-key"),
    error: $("error"), messages: $("messages"), empty: $("empty"),
    composer: $("composer"), prompt: $("prompt"), send: $("send"), stop: $("stop"), status: $("composer-status"),
    attach: $("attach"), attachFile: $("attach-file"), attachments: $("attachments"),
    template: $("message-template"),
  };

  // ------------------------------------------------------------------ storage

  function readJson(key, fallback) {
    try {
      const value = JSON.parse(localStorage.getItem(key));
      return value === null ? fallback : value;
    } catch (_) {
      return fallback;
    }
  }

  function writeJson(key, value) {
    try {
      localStorage.setItem(key, JSON.stringify(value));
    } catch (err) {
      showError("Could not save the conversation in this browser (" + err.message + "). Export it to keep it.");
    }
  }

  const settings = Object.assign({ temperature: "", maxTokens: "", apiKey: "", model: "", system: "" },
    readJson(STORE.settings, {}));
  let conversations = readJson(STORE.conversations, []);
  if (!Array.isArray(conversations)) conversations = [];
  let currentId = localStorage.getItem(STORE.current);

  const saveSettings = () => writeJson(STORE.settings, settings);
  const saveConversations = () => writeJson(STORE.conversations, conversations);
  const current = () => conversations.find((c) => c.id === currentId) || null;

  // ------------------------------------------------------------------ errors, said plainly

  class ApiError extends Error {
    constructor(status, code, message, retryAfter) {
      super(message);
      this.status = status;
      this.code = code;
      this.retryAfter = retryAfter;
    }
  }

  async function errorFrom(response) {
    let code = null;
    let message = response.statusText || "error";
    try {
      const body = await response.json();
      if (body && body.error) {
        code = body.error.code || null;
        message = body.error.message || message;
      }
    } catch (_) { /* not JSON */ }
    return new ApiError(response.status, code, message, response.headers.get("Retry-After"));
  }

  function explain(err) {
    if (err instanceof ApiError) {
      if (err.status === 401) {
        return "This server needs an API key. Enter it in Settings (API key), then try again.";
      }
      if (err.code === "queue_full") {
        const wait = err.retryAfter ? " Try again in " + err.retryAfter + " s." : " Try again shortly.";
        return "The server is busy: every slot is answering and the waiting queue is full." + wait;
      }
      if (err.code === "does_not_fit") return "This model does not fit on this machine: " + err.message;
      if (err.code === "model_loading") return "The model is still loading. Send again in a moment.";
      if (err.code === "model_not_loaded") return "The model is not loaded: " + err.message;
      if (err.code === "model_crashed") return "The model crashed while answering: " + err.message;
      if (err.code === "context_length_exceeded") {
        return "This conversation no longer fits the model's context: " + err.message +
          " Start a new chat, or edit an earlier message to shorten it.";
      }
      if (err.code === "model_not_found") return "The server has no such model: " + err.message;
      return "The server answered " + (err.status || "with an error") + ": " + err.message;
    }
    if (err && err.name === "TypeError") {
      return "Cannot reach the localllm server at " + location.origin +
        ". It may have stopped: start it again (localllm serve), then retry.";
    }
    return "Something went wrong: " + (err && err.message ? err.message : String(err));
  }

  function showError(text) {
    els.error.textContent = text;
    els.error.hidden = !text;
  }

  function handleError(err) {
    showError(explain(err));
    if (err instanceof ApiError && err.status === 401) {
      openSettings(true);
      els.apiKey.focus();
    }
  }

  // ------------------------------------------------------------------ the API

  function headers(json) {
    const h = {};
    if (json) h["Content-Type"] = "application/json";
    if (settings.apiKey) h.Authorization = "Bearer " + settings.apiKey;
    return h;
  }

  async function api(path, body, signal) {
    const response = await fetch(path, {
      method: body === undefined ? "GET" : "POST",
      headers: headers(body !== undefined),
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
    });
    if (!response.ok) throw await errorFrom(response);
    return response;
  }

  // ------------------------------------------------------------------ models

  let models = [];
  let routerMode = false;
  let refreshTimer = 0;

  function planOf(card) {
    const extra = card.localllm || {};
    return extra.plan || {};
  }

  function statusOf(card) {
    return (card.status && card.status.value) || "loaded";
  }

  function contextOf(card) {
    const extra = card.localllm || {};
    const plan = planOf(card);
    return plan.tokens_per_conversation || extra.n_ctx_slot ||
      (extra.loaded && extra.loaded.n_ctx_per_slot) || null;
  }

  function canChat(card) {
    const caps = card.localllm && card.localllm.capabilities;
    return !Array.isArray(caps) || caps.includes("chat");
  }

  function canSee(card) { // a folder's card lists capabilities; one model's says vision
    const extra = (card && card.localllm) || {};
    return extra.vision === true || (Array.isArray(extra.capabilities) && extra.capabilities.includes("vision"));
  }

  // ------------------------------------------------------------------ images (vision models)

  let pendingImages = []; // data: URLs attached to the next message

  function drawAttachments() {
    els.attachments.textContent = "";
    els.attachments.hidden = !pendingImages.length;
    pendingImages.forEach((url, i) => {
      const remove = document.createElement("button");
      remove.type = "button";
      remove.title = "Remove this image";
      remove.setAttribute("aria-label", "Remove image " + (i + 1));
      const img = document.createElement("img");
      img.className = "thumb";
      img.src = url;
      img.alt = "";
      remove.append(img);
      remove.addEventListener("click", () => { pendingImages.splice(i, 1); drawAttachments(); els.prompt.focus(); });
      els.attachments.append(remove);
    });
  }

  function readImage(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(file);
    });
  }

  async function attachFiles(files) {
    try {
      for (const file of files) pendingImages.push(await readImage(file));
    } catch (err) {
      showError("Could not read the image (" + err.message + ").");
    }
    els.attachFile.value = "";
    drawAttachments();
    els.prompt.focus();
  }

  async function refreshModels() {
    try {
      const health = await fetch("/health").then((r) => r.json()).catch(() => ({}));
      routerMode = Array.isArray(health.models_loaded);
      const list = await (await api("/v1/models")).json();
      models = list.data || [];
      if (els.error.dataset.source === "models") showError("");
      drawModels();
      if (health.status === "error") {
        showError("The model failed to load: " + (health.error || "see the server's log") + ".");
        els.error.dataset.source = "models";
        return;
      }
      // While a model loads (the server starting, or a load in flight), look again shortly.
      if (health.status === "loading" || models.some((m) => statusOf(m) === "loading")) {
        clearTimeout(refreshTimer);
        refreshTimer = setTimeout(refreshModels, 2000);
      }
    } catch (err) {
      models = [];
      drawModels();
      handleError(err);
      els.error.dataset.source = "models";
    }
  }

  function drawModels() {
    const chosen = els.model.value || settings.model;
    els.model.textContent = "";
    for (const card of models) {
      const option = document.createElement("option");
      option.value = card.id;
      const status = statusOf(card);
      option.textContent = card.id + (status === "loaded" ? "" : " (" + status + ")") +
        (canChat(card) ? "" : " (no chat)");
      option.disabled = !canChat(card);
      els.model.append(option);
    }
    if (models.some((m) => m.id === chosen)) els.model.value = chosen;
    else if (models.length) els.model.value = (models.find((m) => statusOf(m) === "loaded" && canChat(m)) || models[0]).id;
    drawModelInfo();
  }

  function selectedModel() {
    return models.find((m) => m.id === els.model.value) || null;
  }

  function drawModelInfo() {
    const card = selectedModel();
    els.attach.hidden = !canSee(card);
    els.modelInfo.textContent = "";
    els.load.hidden = els.unload.hidden = true;
    if (!card) {
      els.modelInfo.textContent = models.length ? "" : "No models listed.";
      return;
    }
    const extra = card.localllm || {};
    const plan = planOf(card);
    const status = statusOf(card);
    const facts = [];
    facts.push(status);
    const quant = plan.quant || extra.quant;
    if (quant) facts.push(quant);
    const ctx = contextOf(card);
    if (ctx) facts.push(ctx.toLocaleString() + " tokens per conversation");
    if (plan.n_gpu_layers !== undefined && plan.n_layer !== undefined) {
      facts.push(plan.n_gpu_layers + "/" + (plan.n_layer + 1) + " layers on GPU");
    }
    if (plan.decode_tok_s_predicted) facts.push("~" + Math.round(plan.decode_tok_s_predicted) + " tok/s predicted");
    const line = document.createElement("span");
    line.className = "facts";
    line.textContent = facts.join(" · ");
    line.dataset.status = status;
    els.modelInfo.append(line);
    const warnings = [].concat(extra.warnings || [], plan.warnings || []);
    for (const text of new Set(warnings)) {
      const warn = document.createElement("div");
      warn.className = "warning";
      warn.textContent = "⚠ " + text;
      els.modelInfo.append(warn);
    }
    if (extra.plan_error) {
      const warn = document.createElement("div");
      warn.className = "warning";
      warn.textContent = "⚠ " + extra.plan_error;
      els.modelInfo.append(warn);
    }
    if (card.status && card.status.failed) {
      const warn = document.createElement("div");
      warn.className = "warning";
      warn.textContent = "⚠ the last load failed" + (card.status.error ? ": " + card.status.error : "");
      els.modelInfo.append(warn);
    }
    if (routerMode) {
      els.load.hidden = status === "loaded" || status === "loading" || !canChat(card);
      els.unload.hidden = status !== "loaded";
    }
  }

  async function modelAction(action) {
    const card = selectedModel();
    if (!card) return;
    const button = action === "load" ? els.load : els.unload;
    button.disabled = true;
    setStatus((action === "load" ? "Loading " : "Unloading ") + card.id + "…");
    try {
      await api("/models/" + action, { model: card.id });
      setStatus(card.id + (action === "load" ? " loaded." : " unloaded."));
      showError("");
    } catch (err) {
      setStatus("");
      handleError(err);
    } finally {
      button.disabled = false;
      await refreshModels();
      const next = action === "load" ? els.unload : els.load; // keep keyboard focus nearby
      (next.hidden ? els.model : next).focus();
    }
  }

  // ------------------------------------------------------------------ conversations list

  function newId() {
    return Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
  }

  function drawList() {
    els.list.textContent = "";
    const sorted = conversations.slice().sort((a, b) => b.updated - a.updated);
    els.noConversations.hidden = sorted.length > 0;
    for (const conv of sorted) {
      const item = document.createElement("li");
      item.className = "conversation" + (conv.id === currentId ? " current" : "");
      const name = conv.title || "New chat";
      const open = actionButton(name, "Open this conversation", () => {
        switchTo(conv.id);
        closeSidebarOnPhone();
        els.prompt.focus();
      });
      open.className = "conversation-title";
      if (conv.id === currentId) open.setAttribute("aria-current", "true");
      const rename = actionButton("✎", "Rename", () => startRename(item, conv));
      const remove = actionButton("×", "Delete", () => deleteConversation(conv));
      for (const [button, verb] of [[rename, "Rename "], [remove, "Delete "]]) {
        button.className = "icon-button small";
        button.setAttribute("aria-label", verb + name);
      }
      item.append(open, rename, remove);
      els.list.append(item);
    }
  }

  function startRename(item, conv) {
    const input = document.createElement("input");
    input.type = "text";
    input.value = conv.title || "";
    input.className = "rename";
    input.setAttribute("aria-label", "New name (Enter saves, Escape cancels)");
    item.textContent = "";
    item.append(input);
    input.focus();
    input.select();
    let done = false;
    const finish = (save) => {
      if (done) return;
      done = true;
      if (save && input.value.trim()) {
        conv.title = input.value.trim().slice(0, 200);
        saveConversations();
      }
      drawList();
      const again = [...els.list.querySelectorAll(".conversation-title")].find((b) => b.textContent === (conv.title || "New chat"));
      if (again) again.focus();
    };
    input.addEventListener("keydown", (e) => {
      if (e.key === "Enter") { e.preventDefault(); finish(true); }
      if (e.key === "Escape") { e.preventDefault(); finish(false); }
    });
    input.addEventListener("blur", () => finish(true));
  }

  function deleteConversation(conv) {
    if (!confirm("Delete “" + (conv.title || "New chat") + "”? This cannot be undone.")) return;
    if (streaming && streaming.conv === conv) streaming.controller.abort();
    conversations = conversations.filter((c) => c !== conv);
    saveConversations();
    if (currentId === conv.id) switchTo(null);
    else drawList();
    els.newChat.focus();
  }

  function exportAll() {
    const data = JSON.stringify({ exported: new Date().toISOString(), conversations }, null, 2);
    const url = URL.createObjectURL(new Blob([data], { type: "application/json" }));
    const link = document.createElement("a");
    link.href = url;
    link.download = "localllm-conversations-" + new Date().toISOString().slice(0, 10) + ".json";
    els.sidebar.append(link); // inside the sidebar: its click must not close the sidebar
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }

  function switchTo(id) {
    currentId = id;
    if (id) localStorage.setItem(STORE.current, id);
    else localStorage.removeItem(STORE.current);
    const conv = current();
    els.system.value = conv ? conv.system || "" : settings.system;
    if (conv && conv.model && models.some((m) => m.id === conv.model)) {
      els.model.value = conv.model;
      drawModelInfo();
    }
    showError("");
    drawList();
    drawMessages();
  }

  // ------------------------------------------------------------------ messages

  function drawMessages() {
    for (const node of [...els.messages.querySelectorAll(".message")]) node.remove();
    const conv = current();
    els.empty.hidden = Boolean(conv && conv.messages.length);
    if (!conv) return;
    conv.messages.forEach((msg, index) => els.messages.append(messageNode(conv, msg, index)));
    scrollToEnd(true);
  }

  function messageNode(conv, msg, index) {
    const node = els.template.content.firstElementChild.cloneNode(true);
    node.classList.add(msg.role);
    node.dataset.index = String(index);
    node.setAttribute("aria-label", msg.role === "user" ? "You" : "Assistant");
    node.querySelector(".message-role").textContent = msg.role === "user" ? "You" : "Assistant";
    fillMessage(node, msg);
    drawActions(node, conv, msg, index);
    return node;
  }

  function fillMessage(node, msg) {
    const body = node.querySelector(".message-body");
    if (msg.role === "user") {
      body.classList.add("plain");
      body.textContent = msg.content;
      if (msg.images && msg.images.length) {
        const row = document.createElement("div");
        row.className = "message-images";
        for (const url of msg.images) {
          const img = document.createElement("img");
          img.className = "thumb";
          img.src = url;
          img.alt = "attached image";
          row.append(img);
        }
        body.prepend(row);
      }
    } else {
      body.innerHTML = window.LocalMarkdown.render(msg.content || "");
      addCopyButtons(body);
      const live = streaming && streaming.msg === msg;
      if (live && !msg.content && !msg.reasoning) body.innerHTML = '<p class="muted typing">…</p>';
      const reasoning = node.querySelector(".reasoning");
      reasoning.hidden = !msg.reasoning;
      if (msg.reasoning) {
        reasoning.querySelector("summary").textContent = live && !msg.content ? "Thinking…" : "Reasoning";
        reasoning.querySelector(".reasoning-body").innerHTML = window.LocalMarkdown.render(msg.reasoning);
      }
    }
    node.querySelector(".message-stats").textContent = statsText(msg);
    node.classList.toggle("failed", Boolean(msg.error));
  }

  function statsText(msg) {
    if (msg.role !== "assistant") return "";
    const parts = [];
    const s = msg.stats || {};
    if (s.completionTokens !== undefined) parts.push(s.completionTokens + " tokens");
    if (s.tokensPerSecond) parts.push(s.tokensPerSecond.toFixed(1) + " tok/s");
    if (s.contextUsed !== undefined) {
      parts.push("context " + s.contextUsed.toLocaleString() + (s.contextSize ? " / " + s.contextSize.toLocaleString() : "") + " tokens");
    }
    if (msg.stopped) parts.push("stopped");
    else if (s.finishReason === "length") parts.push("cut at the token limit");
    if (msg.error) parts.push("failed: " + msg.error);
    if (s.model) parts.push(s.model);
    return parts.join(" · ");
  }

  function addCopyButtons(container) {
    for (const block of container.querySelectorAll(".code-block")) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "copy small";
      button.textContent = "Copy";
      button.setAttribute("aria-label", "Copy code");
      button.addEventListener("click", () => copyText(block.querySelector("code").textContent, button));
      block.prepend(button);
    }
  }

  async function copyText(text, button) {
    try {
      await navigator.clipboard.writeText(text);
    } catch (_) { // not a secure context (a LAN address over http): the old way
      const area = document.createElement("textarea");
      area.value = text;
      document.body.append(area);
      area.select();
      document.execCommand("copy");
      area.remove();
    }
    const was = button.textContent;
    button.textContent = "Copied";
    setTimeout(() => { button.textContent = was; }, 1500);
  }

  function actionButton(label, title, handler) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "small";
    button.textContent = label;
    button.title = title;
    button.addEventListener("click", handler);
    return button;
  }

  function drawActions(node, conv, msg, index) {
    const bar = node.querySelector(".message-actions");
    bar.textContent = "";
    if (streaming) return;
    if (msg.role === "user") {
      bar.append(actionButton("Edit", "Edit this message and send it again", () => startEdit(node, conv, index)));
    } else {
      bar.append(actionButton("Copy", "Copy this answer", (e) => copyText(msg.content || "", e.currentTarget)));
      if (index === conv.messages.length - 1) {
        bar.append(actionButton("Regenerate", "Write this answer again", () => regenerate(conv)));
      }
    }
  }

  function redrawActions() {
    const conv = current();
    if (!conv) return;
    for (const node of els.messages.querySelectorAll(".message")) {
      const index = Number(node.dataset.index);
      drawActions(node, conv, conv.messages[index], index);
    }
  }

  function startEdit(node, conv, index) {
    const msg = conv.messages[index];
    const body = node.querySelector(".message-body");
    const bar = node.querySelector(".message-actions");
    body.textContent = "";
    const area = document.createElement("textarea");
    area.className = "edit";
    area.value = msg.content;
    area.rows = Math.min(12, msg.content.split("\n").length + 1);
    area.setAttribute("aria-label", "Edit your message (Enter sends, Shift+Enter adds a line, Escape cancels)");
    body.append(area);
    bar.textContent = "";
    const send = () => {
      const text = area.value.trim();
      if (!text && !(msg.images && msg.images.length)) return;
      conv.messages.splice(index);
      const edited = { role: "user", content: text };
      if (msg.images && msg.images.length) edited.images = msg.images; // an edit keeps the images
      conv.messages.push(edited);
      touch(conv);
      drawMessages();
      answer(conv);
    };
    const cancel = () => { drawMessages(); els.prompt.focus(); };
    bar.append(actionButton("Send", "Send the edited message (later messages are replaced)", send),
      actionButton("Cancel", "Keep the message as it was", cancel));
    area.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
      if (e.key === "Escape") { e.preventDefault(); cancel(); }
    });
    area.focus();
  }

  function regenerate(conv) {
    if (conv.messages.length && conv.messages[conv.messages.length - 1].role === "assistant") conv.messages.pop();
    drawMessages();
    answer(conv);
  }

  function nearBottom() {
    const el = document.scrollingElement;
    const box = els.messages;
    if (box.scrollHeight > box.clientHeight + 4) return box.scrollHeight - box.scrollTop - box.clientHeight < 80;
    return el.scrollHeight - el.scrollTop - el.clientHeight < 80;
  }

  function scrollToEnd(force) {
    if (force || nearBottom()) els.messages.scrollTop = els.messages.scrollHeight;
  }

  // ------------------------------------------------------------------ sending and streaming

  let streaming = null; // {conv, msg, controller}

  function touch(conv) {
    conv.updated = Date.now();
    saveConversations();
  }

  function setStatus(text) {
    els.status.textContent = text;
  }

  function setStreaming(on) {
    els.send.hidden = on;
    els.stop.hidden = !on;
    els.composer.classList.toggle("busy", on);
    els.messages.setAttribute("aria-busy", String(on)); // screen readers wait for the whole answer
    if (!on && document.activeElement === document.body) els.prompt.focus();
  }

  function requestBody(conv) {
    const messages = [];
    if (conv.system && conv.system.trim()) messages.push({ role: "system", content: conv.system });
    for (const m of conv.messages) {
      if (m.role === "assistant" && (m.error && !m.content)) continue;
      if (m.images && m.images.length) {
        const parts = m.images.map((url) => ({ type: "image_url", image_url: { url } }));
        if (m.content) parts.push({ type: "text", text: m.content });
        messages.push({ role: m.role, content: parts });
      } else {
        messages.push({ role: m.role, content: m.content || "" });
      }
    }
    const body = { model: conv.model, messages, stream: true, stream_options: { include_usage: true } };
    const temperature = parseFloat(settings.temperature);
    if (!Number.isNaN(temperature)) body.temperature = temperature;
    const maxTokens = parseInt(settings.maxTokens, 10);
    if (maxTokens > 0) body.max_tokens = maxTokens;
    return body;
  }

  async function send() {
    const text = els.prompt.value.trim();
    if ((!text && !pendingImages.length) || streaming) return;
    let conv = current();
    if (!conv) {
      conv = { id: newId(), title: (text || "Image").split("\n")[0].slice(0, 60), created: Date.now(), updated: Date.now(),
        system: els.system.value, model: els.model.value, messages: [] };
      conversations.push(conv);
      currentId = conv.id;
      localStorage.setItem(STORE.current, conv.id);
    }
    const user = { role: "user", content: text };
    if (pendingImages.length) user.images = pendingImages;
    pendingImages = [];
    drawAttachments();
    conv.messages.push(user);
    els.prompt.value = "";
    autoGrow();
    touch(conv);
    drawList();
    drawMessages();
    await answer(conv);
  }

  async function answer(conv) {
    showError("");
    conv.model = els.model.value || conv.model;
    conv.system = els.system.value;
    const msg = { role: "assistant", content: "", reasoning: "", stats: { model: conv.model } };
    const controller = new AbortController();
    const body = requestBody(conv);
    conv.messages.push(msg);
    streaming = { conv, msg, controller };
    touch(conv);
    drawMessages();
    setStreaming(true);
    setStatus("Writing…");
    const node = () => els.messages.querySelector('.message[data-index="' + (conv.messages.length - 1) + '"]');
    let frame = 0;
    let lastSave = 0;
    const redraw = () => {
      frame = 0;
      const n = currentId === conv.id && node();
      if (n) { fillMessage(n, msg); scrollToEnd(false); }
      if (Date.now() - lastSave > 1000) { lastSave = Date.now(); saveConversations(); }
    };
    const schedule = () => { if (!frame) frame = requestAnimationFrame(redraw); };
    const started = performance.now();
    let firstToken = null;
    let lastToken = null;
    let usage = null;
    try {
      const response = await api("/v1/chat/completions", body, controller.signal);
      await readEvents(response, (event) => {
        if (event.error) {
          throw new ApiError(event.error.code === "queue_full" ? 503 : 0, event.error.code, event.error.message, null);
        }
        if (event.usage) usage = event.usage;
        const choice = event.choices && event.choices[0];
        if (!choice) return;
        const delta = choice.delta || {};
        const thought = delta.reasoning_content || delta.reasoning || ""; // llama-server's, vLLM's
        if (delta.content || thought) {
          lastToken = performance.now();
          if (firstToken === null) firstToken = lastToken;
          msg.content += delta.content || "";
          msg.reasoning += thought;
          schedule();
        }
        if (choice.finish_reason) msg.stats.finishReason = choice.finish_reason;
      });
      setStatus("Answer complete.");
    } catch (err) {
      if (err.name === "AbortError") {
        msg.stopped = true;
        setStatus("Stopped.");
      } else {
        msg.error = explain(err);
        setStatus("");
        handleError(err);
      }
    } finally {
      if (frame) cancelAnimationFrame(frame);
      const ended = performance.now();
      if (usage) {
        const card = models.find((m) => m.id === conv.model);
        msg.stats.completionTokens = usage.completion_tokens;
        msg.stats.contextUsed = usage.total_tokens;
        msg.stats.contextSize = card ? contextOf(card) : null;
        // Decode speed: the tokens after the first over the time from the first to the last.
        if (firstToken !== null && usage.completion_tokens > 1 && lastToken > firstToken) {
          msg.stats.tokensPerSecond = (usage.completion_tokens - 1) / ((lastToken - firstToken) / 1000);
        }
      }
      msg.stats.seconds = (ended - started) / 1000;
      streaming = null;
      touch(conv);
      if (currentId === conv.id) drawMessages();
      drawList();
      setStreaming(false);
      refreshModels();
    }
  }

  // Server-sent events from a fetch body: `data: {...}` lines, events split by a blank line.
  async function readEvents(response, onEvent) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const raw = buffer.slice(0, cut);
        buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
        const data = raw.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
    throw new TypeError("the answer ended early: the server closed the connection");
  }

  // ------------------------------------------------------------------ layout and keys

  function autoGrow() {
    els.prompt.style.height = "auto";
    els.prompt.style.height = Math.min(els.prompt.scrollHeight, window.innerHeight * 0.4) + "px";
  }

  function openSettings(open) {
    els.settings.hidden = !open;
    els.toggleSettings.setAttribute("aria-expanded", String(open));
  }

  function closeSidebarOnPhone() {
    if (document.body.classList.contains("sidebar-open")) {
      document.body.classList.remove("sidebar-open");
      els.toggleSidebar.setAttribute("aria-expanded", "false");
    }
  }

  els.composer.addEventListener("submit", (e) => { e.preventDefault(); send(); });
  els.prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  els.prompt.addEventListener("input", autoGrow);
  els.stop.addEventListener("click", () => { if (streaming) streaming.controller.abort(); els.prompt.focus(); });
  document.addEventListener("keydown", (e) => {
    if (e.key !== "Escape") return;
    if (document.body.classList.contains("sidebar-open")) {
      closeSidebarOnPhone();
      els.toggleSidebar.focus();
    } else if (streaming) {
      streaming.controller.abort();
    }
  });
  document.addEventListener("click", (e) => { // a tap beside the drawn-over sidebar closes it
    const path = e.composedPath(); // as dispatched: a rename may have replaced the target since
    if (!path.includes(els.sidebar) && !path.includes(els.toggleSidebar)) closeSidebarOnPhone();
  });
  els.newChat.addEventListener("click", () => { switchTo(null); closeSidebarOnPhone(); els.prompt.focus(); });
  els.exportAll.addEventListener("click", exportAll);
  els.model.addEventListener("change", () => { settings.model = els.model.value; saveSettings(); drawModelInfo(); });
  els.load.addEventListener("click", () => modelAction("load"));
  els.attach.addEventListener("click", () => els.attachFile.click());
  els.attachFile.addEventListener("change", () => attachFiles([...els.attachFile.files]));
  els.unload.addEventListener("click", () => modelAction("unload"));
  els.toggleSettings.addEventListener("click", () => openSettings(els.settings.hidden));
  els.toggleSidebar.addEventListener("click", () => {
    const open = document.body.classList.toggle("sidebar-open");
    els.toggleSidebar.setAttribute("aria-expanded", String(open));
    if (open) els.newChat.focus();
  });
  els.system.addEventListener("change", () => {
    const conv = current();
    if (conv) { conv.system = els.system.value; touch(conv); }
    settings.system = els.system.value;
    saveSettings();
  });
  for (const [el, key] of [[els.temperature, "temperature"], [els.maxTokens, "maxTokens"]]) {
    el.value = settings[key];
    el.addEventListener("change", () => { settings[key] = el.value; saveSettings(); });
  }
  els.apiKey.value = settings.apiKey;
  els.apiKey.addEventListener("change", () => {
    settings.apiKey = els.apiKey.value.trim();
    saveSettings();
    refreshModels();
  });
  window.addEventListener("focus", () => { if (!streaming) refreshModels(); });
  window.addEventListener("storage", (e) => { // another tab changed the conversations
    if (e.key === STORE.conversations && !streaming) {
      conversations = readJson(STORE.conversations, []);
      drawList();
      drawMessages();
    }
  });

  if (currentId && !current()) currentId = null;
  switchTo(currentId);
  refreshModels().then(() => {
    const conv = current();
    if (conv && conv.model && models.some((m) => m.id === conv.model)) { els.model.value = conv.model; drawModelInfo(); }
  });
  els.prompt.focus();
})();
