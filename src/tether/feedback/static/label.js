// tether label: every text from the server goes into the page with textContent, never as markup.
"use strict";

const $ = (id) => document.getElementById(id);
let current = null;   // the item on screen: {key, prompt (text or messages), responses (shown order), k}
let ranking = [];     // shown positions, best first (K-wise items)
let busy = false;

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (cls) node.className = cls;
  return node;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function call(path, body) {
  const init = body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  const response = await fetch(path, init);
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

function strength() {
  const picked = document.querySelector('input[name="strength"]:checked');
  return picked ? picked.value : "";
}

function resetInputs() {
  document.querySelector('input[name="strength"][value=""]').checked = true;
  $("note").value = "";
  ranking = [];
}

function render(state) {
  $("rater").textContent = "rater: " + state.rater;
  const shown = Math.min(state.done + (state.item ? 1 : 0), state.total);
  $("progress-text").textContent = state.item ? `item ${shown} of ${state.total}` :
    `${state.done} of ${state.total} labelled`;
  $("progress").max = state.total;
  $("progress").value = state.done;
  current = state.item || null;
  $("item").hidden = !current;
  $("finished").hidden = !!current;
  if (!current) { renderSummary(state.summary || {}); return; }
  renderPrompt(current.prompt);
  const pair = current.k === 2;
  $("pair-controls").hidden = !pair;
  $("rank-controls").hidden = pair;
  $("help-pair").hidden = !pair;
  $("help-rank").hidden = pair;
  const box = $("responses");
  box.replaceChildren();
  current.responses.forEach((text, position) => {
    const card = el("div", undefined, "card");
    card.dataset.position = String(position);
    const title = pair ? (position === 0 ? "Left" : "Right") : `Response ${position + 1}`;
    const heading = el("h3", title);
    heading.append(" ", el("span", "", "place"));
    card.append(heading, el("div", text, "response"));
    if (!pair) card.addEventListener("click", () => pick(position));
    box.append(card);
  });
  renderRanking();
}

// A plain prompt is one text; a conversation is one block per message: its role, then its content.
function renderPrompt(prompt) {
  const box = $("prompt");
  box.replaceChildren();
  const chat = Array.isArray(prompt);
  box.classList.toggle("chat", chat);
  if (!chat) { box.textContent = prompt; return; }
  for (const message of prompt) {
    const turn = el("div", undefined, "turn");
    turn.dataset.role = String(message.role);
    const content = typeof message.content === "string" ? message.content : JSON.stringify(message.content);
    turn.append(el("div", String(message.role), "role"), el("div", content, "content"));
    box.append(turn);
  }
}

function renderRanking() {
  if (!current || current.k === 2) return;
  $("ranking").textContent = ranking.map((p) => p + 1).join(" > ") || "(none yet)";
  document.querySelectorAll(".card").forEach((card) => {
    const place = ranking.indexOf(Number(card.dataset.position));
    card.classList.toggle("picked", place >= 0);
    card.querySelector(".place").textContent = place >= 0 ? `#${place + 1}` : "";
  });
  $("submit-ranking").disabled = ranking.length !== current.k;
}

function pick(position) {
  if (!current || current.k === 2 || position >= current.k || ranking.includes(position)) return;
  ranking.push(position);
  if (ranking.length === current.k - 1) {  // the last one is implied
    for (let p = 0; p < current.k; p++) if (!ranking.includes(p)) ranking.push(p);
  }
  renderRanking();
}

async function send(decision, extra) {
  if (!current || busy) return;
  busy = true;
  try {
    const state = await call("/api/label", {key: current.key, decision, strength: strength(),
                                            note: $("note").value, ...extra});
    showError("");
    resetInputs();
    render(state);
  } catch (err) {
    showError("Not saved: " + err.message);
  } finally {
    busy = false;
  }
}

function renderSummary(s) {
  const table = $("summary");
  table.replaceChildren();
  const row = (name, value) => {
    const tr = el("tr");
    tr.append(el("td", name), el("td", value));
    table.append(tr);
  };
  const pct = (x) => (100 * x).toFixed(1) + "%";
  row("items", String(s.items ?? ""));
  for (const [name, n] of Object.entries(s.labelled_by_rater || {})) row(`labelled by ${name}`, String(n));
  for (const [name, n] of Object.entries(s.decisions || {})) row(`decision: ${name}`, String(n));
  const w = s.win_rate_a;
  if (w) {
    row("win rate of a", `${pct(w.win_rate)}  [${pct(w.ci95_low)}, ${pct(w.ci95_high)}]`);
    row("wins / ties / losses", `${w.wins} / ${w.ties} / ${w.losses}`);
  }
  const a = s.agreement || {};
  if (a.items_labelled_twice) {
    row("items labelled twice", String(a.items_labelled_twice));
    row("inter-rater agreement", `${pct(a.agreement)} (Cohen's kappa ${a.cohen_kappa.toFixed(2)})`);
  }
  const g = s.agreement_with_input || {};
  if (g.comparisons) row("agreement with the input's labels", pct(g.agreement));
}

function wire() {
  $("left").addEventListener("click", () => send("chose", {choice: 0}));
  $("right").addEventListener("click", () => send("chose", {choice: 1}));
  $("tie").addEventListener("click", () => send("tie"));
  $("tie-all").addEventListener("click", () => send("tie"));
  $("skip").addEventListener("click", () => send("skip"));
  $("undo").addEventListener("click", () => { ranking.pop(); renderRanking(); });
  $("submit-ranking").addEventListener("click", () => {
    if (current && ranking.length === current.k) send("ranked", {ranking});
  });
  document.addEventListener("keydown", (event) => {
    if (event.target === $("note")) {
      if (event.key === "Escape") $("note").blur();
      return;
    }
    if (!current || event.ctrlKey || event.metaKey || event.altKey) return;
    const pair = current.k === 2;
    const key = event.key;
    let handled = true;
    if (pair && (key === "1" || key === "ArrowLeft")) send("chose", {choice: 0});
    else if (pair && (key === "2" || key === "ArrowRight")) send("chose", {choice: 1});
    else if (!pair && /^[1-9]$/.test(key)) pick(Number(key) - 1);
    else if (!pair && key === "Backspace") { ranking.pop(); renderRanking(); }
    else if (!pair && key === "Enter") { if (ranking.length === current.k) send("ranked", {ranking}); }
    else if (key === "t") send("tie");
    else if (key === "s") send("skip");
    else if (key === "z") document.querySelector('input[name="strength"][value="slightly"]').checked = true;
    else if (key === "x") document.querySelector('input[name="strength"][value="much"]').checked = true;
    else if (key === "n") $("note").focus();
    else handled = false;
    if (handled) event.preventDefault();
  });
}

wire();
call("/api/state").then(render).catch((err) => showError("Could not load: " + err.message));
