// The admin console (no build step, no library). Every text that came from a customer or a
// provider is put in the page with textContent, never parsed as HTML.
"use strict";

const TEXTS = {
  en: {
    title: "WhatsApp agent admin", nav_chats: "Chats", nav_delivery: "Providers and delivery", nav_overview: "Overview",
    logout: "Log out", token_label: "Admin token", login: "Log in", wrong_token: "Wrong token.",
    search: "Search by number or name", all_states: "All states", all_instances: "All instances",
    state_answering: "answering", state_waiting: "waiting", state_paused: "paused by an operator",
    state_takeover: "human takeover", state_finished: "finished (booking link sent)", state_failed: "failed",
    col_chat: "Chat", col_state: "State", col_last: "Last message", col_mailbox: "Mailbox", col_window: "Window",
    col_expires: "Expires in", no_chats: "No chats yet.", newest: "Newest", older: "Older", chats_count: "{n} chats",
    back: "Back to chats", pause_for: "Pause for (minutes)", pause: "Pause", pause_forever: "Pause until resumed",
    resume: "Resume", reset: "Reset memory", reset_question: "Forget this chat's messages?", reset_yes: "Yes, reset",
    cancel: "Cancel", reply_label: "Reply as an operator (the bot pauses for this chat)", send: "Send",
    role_user: "customer", role_assistant: "bot", role_operator: "operator",
    f_number: "Number", f_instance: "Instance", f_state: "State", f_booking: "Booking link sent", f_lead: "Krayin lead",
    f_crashes: "Crashes", f_last_error: "Last error", f_paused_until: "Paused until", f_mailbox: "Mailbox",
    f_summary: "Summary of earlier messages",
    until_resumed: "until resumed", yes: "yes", no: "no", none: "—",
    providers: "LLM providers", col_provider: "Provider", col_circuit: "Circuit", col_in_flight: "In flight",
    col_errors: "Errors", col_last_error: "Last error", outbound: "Outbound", crm: "CRM", dead_letters: "Dead letters",
    col_when: "When", col_kind: "Kind", col_reason: "Reason", no_dead: "No dead letters.", retry: "Retry",
    discard: "Discard", traffic: "Messages per minute, last hour", msgs_in: "messages in", msgs_out: "replies out",
    o_live: "Live actors", o_stored: "Stored chats", o_uptime: "Uptime", o_version: "Version", o_ready: "Ready",
    nodes: "Nodes sharing the database", col_node: "Node", col_address: "Address", col_heartbeat: "Last heartbeat",
    col_shards: "Shards", col_takeovers: "Takeovers", col_fenced: "Fenced writes refused", live: "live",
    silent: "silent", this_node: "this node",
    done: "Done.", queued: "Queued: it will apply shortly.", failed_request: "Request failed: {e}",
    ago: "{t} ago", in_: "in {t}", offline: "Connection lost; retrying…",
  },
  es: {
    title: "Administración del agente de WhatsApp", nav_chats: "Chats", nav_delivery: "Proveedores y envíos",
    nav_overview: "Resumen", logout: "Cerrar sesión", token_label: "Token de administración", login: "Entrar",
    wrong_token: "Token incorrecto.", search: "Buscar por número o nombre", all_states: "Todos los estados",
    all_instances: "Todas las instancias", state_answering: "respondiendo", state_waiting: "esperando",
    state_paused: "pausado por un operador", state_takeover: "atención humana",
    state_finished: "finalizado (link de reserva enviado)", state_failed: "con fallas",
    col_chat: "Chat", col_state: "Estado", col_last: "Último mensaje", col_mailbox: "Buzón", col_window: "Ventana",
    col_expires: "Expira en", no_chats: "Todavía no hay chats.", newest: "Más recientes", older: "Anteriores",
    chats_count: "{n} chats", back: "Volver a los chats", pause_for: "Pausar durante (minutos)", pause: "Pausar",
    pause_forever: "Pausar hasta reanudar", resume: "Reanudar", reset: "Borrar memoria",
    reset_question: "¿Olvidar los mensajes de este chat?", reset_yes: "Sí, borrar", cancel: "Cancelar",
    reply_label: "Responder como operador (el bot se pausa en este chat)", send: "Enviar",
    role_user: "cliente", role_assistant: "bot", role_operator: "operador",
    f_number: "Número", f_instance: "Instancia", f_state: "Estado", f_booking: "Link de reserva enviado",
    f_lead: "Lead de Krayin", f_crashes: "Fallas", f_last_error: "Último error", f_paused_until: "Pausado hasta",
    f_mailbox: "Buzón", f_summary: "Resumen de los mensajes anteriores", until_resumed: "hasta reanudar", yes: "sí", no: "no", none: "—",
    providers: "Proveedores de LLM", col_provider: "Proveedor", col_circuit: "Circuito", col_in_flight: "En curso",
    col_errors: "Errores", col_last_error: "Último error", outbound: "Envíos", crm: "CRM",
    dead_letters: "Mensajes no entregados", col_when: "Cuándo", col_kind: "Tipo", col_reason: "Motivo",
    no_dead: "No hay mensajes no entregados.", retry: "Reintentar", discard: "Descartar",
    traffic: "Mensajes por minuto, última hora", msgs_in: "mensajes recibidos", msgs_out: "respuestas enviadas",
    o_live: "Actores vivos", o_stored: "Chats guardados", o_uptime: "Tiempo activo", o_version: "Versión",
    o_ready: "Listo", nodes: "Nodos que comparten la base de datos", col_node: "Nodo", col_address: "Dirección",
    col_heartbeat: "Último latido", col_shards: "Shards", col_takeovers: "Tomas de control",
    col_fenced: "Escrituras rechazadas", live: "activo", silent: "sin latido", this_node: "este nodo",
    done: "Hecho.", queued: "En cola: se aplicará en breve.",
    failed_request: "La solicitud falló: {e}", ago: "hace {t}", in_: "en {t}", offline: "Sin conexión; reintentando…",
  },
};
const LANG = document.documentElement.lang === "es" ? "es" : "en";
const POLL_MS = 1000;
const FOREVER = 253402300799;

function t(key, values) {
  let text = TEXTS[LANG][key] ?? TEXTS.en[key] ?? key;
  for (const [name, value] of Object.entries(values || {})) text = text.replace(`{${name}}`, String(value));
  return text;
}

const $ = (id) => document.getElementById(id);

// el("td", {class: "x", "data-label": "y"}, "text", child): children are text or nodes, never HTML.
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value !== undefined && value !== null && value !== false) node.setAttribute(name, String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function duration(seconds) {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}
const clock = (unix) => new Date(unix * 1000).toLocaleString(LANG);
const ago = (unix) => t("ago", { t: duration(Date.now() / 1000 - unix) });

// -- session and requests ---------------------------------------------------------------------

const session = { csrf: "", authRequired: false };

class HttpError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (method !== "GET") {
    headers["Content-Type"] = "application/json";
    headers["X-CSRF-Token"] = session.csrf;
  }
  const response = await fetch(path, {
    method, headers, credentials: "same-origin", cache: "no-store",
    body: method === "GET" ? undefined : JSON.stringify(body || {}),
  });
  const data = await response.json().catch(() => ({}));
  if (response.status === 401 && path !== "/admin/login") {
    showLogin();
    throw new HttpError(401, data.error || "login required");
  }
  if (!response.ok) throw new HttpError(response.status, data.error || response.statusText);
  return data;
}

async function startSession() {
  const response = await fetch("/admin/session", { credentials: "same-origin", cache: "no-store" });
  const data = await response.json().catch(() => ({}));
  session.authRequired = Boolean(data.auth_required);
  if (data.authenticated) return useSession(data);
  if (!session.authRequired) return login("");   // loopback without ADMIN_TOKEN: no token to ask for
  showLogin();
}

async function login(token) {
  const data = await api("POST", "/admin/login", { token });
  useSession(data);
}

function useSession(data) {
  session.csrf = data.csrf;
  session.authRequired = Boolean(data.auth_required);
  $("nav").hidden = false;
  $("logout").hidden = !session.authRequired;
  $("view-login").hidden = true;
  route();
}

function showLogin() {
  session.csrf = "";
  stopPolling();
  for (const section of document.querySelectorAll("main > section")) section.hidden = true;
  $("nav").hidden = true;
  $("view-login").hidden = false;
  $("token").focus();
}

function notify(text) {
  const notice = $("notice");
  notice.textContent = text;
  notice.hidden = !text;
}

// -- routing and polling ----------------------------------------------------------------------

let timer = null;
let refresh = null;
let inFlight = false;

function stopPolling() {
  if (timer !== null) clearInterval(timer);
  timer = null;
}

function poll(fn) {
  stopPolling();
  refresh = fn;
  const tick = async () => {
    if (inFlight || document.visibilityState === "hidden") return;
    inFlight = true;
    try {
      await refresh();
      if ($("notice").textContent === t("offline")) notify("");
    } catch (error) {
      if (!(error instanceof HttpError)) notify(t("offline"));
    } finally {
      inFlight = false;
    }
  };
  tick();
  timer = setInterval(tick, POLL_MS);
}

function route() {
  if (!session.csrf) return;
  const hash = location.hash || "#/chats";
  const [, view, ...rest] = hash.split("/");
  for (const section of document.querySelectorAll("main > section")) section.hidden = true;
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle("active", link.dataset.view === (view === "chat" ? "chats" : view));
  }
  if (view === "chat" && rest.length) {
    chatView.open(decodeURIComponent(rest[0]), rest.length > 1 ? decodeURIComponent(rest[1]) : "");
  } else if (view === "delivery") {
    $("view-delivery").hidden = false;
    poll(renderDelivery);
  } else if (view === "overview") {
    $("view-overview").hidden = false;
    poll(renderOverview);
  } else {
    $("view-chats").hidden = false;
    poll(renderChats);
  }
}

// -- chats ------------------------------------------------------------------------------------

const list = { cursors: [], after: "", next: null };

function stateBadge(state) {
  return el("span", { class: `state ${state}` }, t(`state_${state}`));
}

async function renderChats() {
  const query = new URLSearchParams({ limit: "50" });
  const q = $("search").value.trim();
  if (q) query.set("q", q);
  if ($("state-filter").value) query.set("state", $("state-filter").value);
  if ($("instance-filter").value) query.set("instance", $("instance-filter").value);
  if (list.after) query.set("after", list.after);
  const data = await api("GET", `/admin/api/chats?${query}`);
  list.next = data.next;
  const rows = data.chats.map((chat) => {
    const who = el("td", { class: "who" },
      el("div", { class: "name" }, chat.name || chat.number),
      el("div", { class: "sub" }, chat.name ? chat.number : null, chat.instance ? ` · ${chat.instance}` : null));
    const row = el("tr", { class: "chat", "data-jid": chat.jid, "data-instance": chat.instance, tabindex: "0" }, who,
      el("td", { "data-label": t("col_state") }, stateBadge(chat.state)),
      el("td", { "data-label": t("col_last") }, el("div", { class: "preview" }, chat.preview),
        el("div", { class: "time" }, ago(chat.last_activity))),
      el("td", { "data-label": t("col_mailbox"), class: "small" }, chat.mailbox_depth),
      el("td", { "data-label": t("col_window"), class: "small" }, chat.window_size),
      el("td", { "data-label": t("col_expires"), class: "small" }, duration(chat.expires_at - data.now)));
    return row;
  });
  $("chat-rows").replaceChildren(...rows);
  $("chats-empty").hidden = rows.length > 0;
  $("chat-count").textContent = t("chats_count", { n: data.total });
  $("older").hidden = !data.next;
  $("newest").hidden = list.cursors.length === 0;
  const select = $("instance-filter");
  const chosen = select.value;
  if (data.instances.length) {
    select.replaceChildren(el("option", { value: "" }, t("all_instances")),
      ...data.instances.map((name) => el("option", { value: name }, name)));
    select.value = chosen;
  }
  select.hidden = data.instances.length === 0;
}

function openChatRow(event) {
  const row = event.target.closest("tr[data-jid]");
  if (row) location.hash = `#/chat/${encodeURIComponent(row.dataset.jid)}/${encodeURIComponent(row.dataset.instance)}`;
}

function resetPaging() {
  list.cursors = [];
  list.after = "";
  renderChats().catch(() => {});
}

// -- one chat ---------------------------------------------------------------------------------

const chatView = {
  jid: "",
  instance: "",
  shown: "",
  path(suffix = "") {   // a conversation is (instance, chat): the instance goes along when known
    const query = this.instance ? `?instance=${encodeURIComponent(this.instance)}` : "";
    return `/admin/api/chats/${encodeURIComponent(this.jid)}${suffix}${query}`;
  },
  open(jid, instance) {
    this.jid = jid;
    this.instance = instance;
    this.shown = "";
    $("reset-confirm").hidden = true;
    $("view-chat").hidden = false;
    poll(() => this.render());
  },
  async render() {
    const chat = await api("GET", this.path());
    this.draw(chat);
  },
  draw(chat) {
    $("chat-title").textContent = chat.name || chat.number;
    const facts = [
      [t("f_number"), chat.number], [t("f_instance"), chat.instance || t("none")],
      [t("f_state"), stateBadge(chat.state)], [t("f_booking"), chat.booking_sent ? t("yes") : t("no")],
      [t("f_lead"), chat.lead_id ?? t("none")], [t("f_crashes"), chat.crashes],
      [t("f_last_error"), chat.last_error || t("none")], [t("f_mailbox"), chat.mailbox_depth],
    ];
    if (chat.paused_until > Date.now() / 1000) {
      facts.push([t("f_paused_until"), chat.paused_until >= FOREVER ? t("until_resumed") : clock(chat.paused_until)]);
    }
    if (chat.summary) facts.push([t("f_summary"), chat.summary]);
    $("chat-facts").replaceChildren(...facts.flatMap(([name, value]) => [el("dt", {}, name), el("dd", {}, value)]));
    const key = JSON.stringify(chat.messages);
    if (key === this.shown) return;    // leave the transcript (and the reader's scroll) alone
    this.shown = key;
    $("transcript").replaceChildren(...chat.messages.map((m) => el("li", { class: `msg ${m.role}` },
      el("div", { class: "meta" }, `${t(`role_${m.role}`)} · ${clock(m.at)}`),
      el("div", { class: "text" }, m.text))));
  },
  async command(name, body) {
    try {
      const result = await api("POST", this.path(`/${name}`), body);
      notify(result.status === "queued" ? t("queued") : t("done"));
      if (result.chat) this.draw(result.chat);
      return true;
    } catch (error) {
      notify(t("failed_request", { e: error.message }));
      return false;
    }
  },
};

// -- providers and delivery -------------------------------------------------------------------

function facts(target, values) {
  target.replaceChildren(...Object.entries(values || {}).flatMap(([name, value]) =>
    [el("dt", {}, name), el("dd", {}, typeof value === "boolean" ? t(value ? "yes" : "no") : value)]));
}

const ms = (value) => (value === null || value === undefined ? "—" : `${Math.round(value)} ms`);

async function renderDelivery() {
  const data = await api("GET", "/admin/api/delivery");
  $("provider-rows").replaceChildren(...data.providers.map((p) => el("tr", { "data-provider": p.name },
    el("td", { "data-label": t("col_provider") }, p.name),
    el("td", { "data-label": t("col_circuit") }, p.circuit),
    el("td", { "data-label": t("col_in_flight") }, p.in_flight),
    el("td", { "data-label": "p50 / p95" }, `${ms(p.latency_p50_ms)} / ${ms(p.latency_p95_ms)}`),
    el("td", { "data-label": t("col_errors") },
      Object.entries(p.failures).map(([kind, n]) => `${kind}: ${n}`).join(", ") || "0"),
    el("td", { "data-label": t("col_last_error"), class: "preview" }, p.last_error || t("none")))));
  facts($("outbound-facts"), data.outbound);
  facts($("crm-facts"), data.crm);
  $("dead-rows").replaceChildren(...data.dead_letters.map((d) => el("tr", { "data-dead": d.id },
    el("td", { "data-label": t("col_when") }, clock(d.at)),
    el("td", { "data-label": t("col_chat") }, d.jid),
    el("td", { "data-label": t("col_kind") }, d.kind),
    el("td", { "data-label": t("col_reason"), class: "preview" }, d.reason),
    el("td", {}, el("button", { type: "button", "data-action": "retry", "data-id": d.id }, t("retry")), " ",
      el("button", { type: "button", "data-action": "discard", "data-id": d.id, class: "danger" }, t("discard"))))));
  $("dead-empty").hidden = data.dead_letters.length > 0;
}

async function deadLetterAction(event) {
  const button = event.target.closest("button[data-action]");
  if (!button) return;
  button.disabled = true;
  try {
    await api("POST", `/admin/api/dead-letters/${button.dataset.id}/${button.dataset.action}`);
    notify(t("done"));
    await renderDelivery();
  } catch (error) {
    notify(t("failed_request", { e: error.message }));
    button.disabled = false;
  }
}

// -- overview ---------------------------------------------------------------------------------

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

function chart(series) {
  const width = 600, height = 160, left = 30, bottom = 20, top = 10;
  const peak = Math.max(1, ...series.map((p) => Math.max(p.in, p.out)));
  const x = (i) => left + (i * (width - left - 5)) / Math.max(1, series.length - 1);
  const y = (v) => height - bottom - (v * (height - bottom - top)) / peak;
  const line = (key) => svg("polyline", { class: `line ${key}`, points: series.map((p, i) => `${x(i)},${y(p[key])}`).join(" ") });
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": t("traffic") });
  root.append(svg("line", { class: "axis", x1: left, y1: height - bottom, x2: width, y2: height - bottom }),
      svg("line", { class: "axis", x1: left, y1: top, x2: left, y2: height - bottom }),
      svg("text", { x: 2, y: top + 8 }, String(peak)), svg("text", { x: 2, y: height - bottom }, "0"),
      svg("text", { x: left, y: height - 4 }, "-60 min"), svg("text", { x: width - 30, y: height - 4 }, "0"),
      line("in"), line("out"));
  return root;
}

async function renderOverview() {
  const data = await api("GET", "/admin/api/overview");
  $("chart").replaceChildren(chart(data.series));
  facts($("overview-facts"), {
    [t("o_live")]: data.live_actors, [t("o_stored")]: data.stored_chats,
    [t("o_uptime")]: duration(data.uptime_seconds), [t("o_version")]: data.version, [t("o_ready")]: data.ready,
  });
  $("nodes-card").hidden = data.nodes.length === 0;
  $("node-rows").replaceChildren(...data.nodes.map((n) => el("tr", { "data-node": n.id },
    el("td", { "data-label": t("col_node") }, n.id, n.this_node ? ` (${t("this_node")})` : ""),
    el("td", { "data-label": t("col_address") }, n.address || t("none")),
    el("td", { "data-label": t("col_state") }, t(n.live ? "live" : "silent")),
    el("td", { "data-label": t("col_heartbeat") }, ago(n.last_heartbeat)),
    el("td", { "data-label": t("col_shards") }, n.shards_owned),
    el("td", { "data-label": t("col_takeovers") }, n.stats.taken_over ?? 0),
    el("td", { "data-label": t("col_fenced") }, n.stats.fenced_refused ?? 0))));
}

// -- wiring -----------------------------------------------------------------------------------

function translate() {
  document.title = t("title");
  for (const node of document.querySelectorAll("[data-i18n]")) node.textContent = t(node.dataset.i18n);
  for (const node of document.querySelectorAll("[data-i18n-placeholder]")) {
    node.setAttribute("placeholder", t(node.dataset.i18nPlaceholder));
  }
}

function wire() {
  $("login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    $("login-error").hidden = true;
    try {
      await login($("token").value);
      $("token").value = "";
    } catch (error) {
      $("login-error").textContent = error.status === 401 ? t("wrong_token") : t("failed_request", { e: error.message });
      $("login-error").hidden = false;
    }
  });
  $("logout").addEventListener("click", async () => {
    try { await api("POST", "/admin/logout"); } finally { showLogin(); }
  });
  $("chat-rows").addEventListener("click", openChatRow);
  $("chat-rows").addEventListener("keydown", (event) => { if (event.key === "Enter") openChatRow(event); });
  let typing = null;
  $("search").addEventListener("input", () => { clearTimeout(typing); typing = setTimeout(resetPaging, 250); });
  $("state-filter").addEventListener("change", resetPaging);
  $("instance-filter").addEventListener("change", resetPaging);
  $("older").addEventListener("click", () => {
    if (!list.next) return;
    list.cursors.push(list.after);
    list.after = list.next;
    renderChats().catch(() => {});
  });
  $("newest").addEventListener("click", resetPaging);
  $("pause").addEventListener("click", () => chatView.command("pause", { minutes: Number($("pause-minutes").value) || null }));
  $("pause-forever").addEventListener("click", () => chatView.command("pause", { minutes: 0 }));
  $("resume").addEventListener("click", () => chatView.command("resume"));
  $("reset").addEventListener("click", () => { $("reset-confirm").hidden = false; });
  $("reset-no").addEventListener("click", () => { $("reset-confirm").hidden = true; });
  $("reset-yes").addEventListener("click", async () => {
    $("reset-confirm").hidden = true;
    await chatView.command("reset");
  });
  $("reply-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = $("reply-text").value;
    if (!text.trim()) return;
    $("reply-send").disabled = true;
    if (await chatView.command("reply", { text })) $("reply-text").value = "";
    $("reply-send").disabled = false;
  });
  $("dead-rows").addEventListener("click", deadLetterAction);
  window.addEventListener("hashchange", route);
}

translate();
wire();
startSession().catch((error) => notify(t("failed_request", { e: error.message })));
