// The edvit dashboard: renders /api/state, then every snapshot /events sends.
// Every id, class name and error comes from the wire: text goes in with textContent only.
"use strict";

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value !== null && value !== undefined) node.setAttribute(name, value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : String(child ?? ""));
  }
  return node;
}

function ms(value) {
  return value === null || value === undefined ? "–" : `${value.toFixed(1)} ms`;
}

function age(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  return seconds < 60 ? `${seconds.toFixed(0)} s` : `${(seconds / 60).toFixed(0)} min`;
}

function short(id) {
  return id ? id.slice(0, 12) : "–";
}

function load(counters) {
  if (!Object.keys(counters).length) return "–";
  const served = counters.frames_served ?? 0;
  const parts = [`${served} frames`];
  if (counters.batches) parts.push(`${counters.batches} batches`);
  if (counters.bad_payloads) parts.push(`${counters.bad_payloads} bad`);
  return parts.join(", ");
}

function fill(tbody, rows) {
  tbody.replaceChildren(...rows);
}

function renderNodes(state) {
  fill(document.querySelector("#nodes tbody"), state.nodes.map((node) => {
    const status = el("span", { class: `state state-${node.state}` }, node.state);
    if (node.error) status.title = node.error;
    return el("tr", { "data-node": node.id },
      el("td", { class: "id" }, node.id),
      el("td", { class: "node-state" }, status),
      el("td", { class: "assigned" }, node.assigned.join(", ") || "–"),
      el("td", {}, (node.submodels || []).join(", ") || "–"),
      el("td", {}, short(node.serving_plan_id || node.plan_id)),
      el("td", {}, load(node.counters || {})),
      el("td", {}, age(node.age_s)));
  }));
  const agg = state.aggregator;
  document.getElementById("aggregator").textContent =
    agg ? `aggregator: ${agg.state}${agg.error ? ` (${agg.error})` : ""}` : "aggregator: no status";
  const health = state.health;
  document.getElementById("health").textContent = !health ? "" :
    `planner ${health.planner}: ${health.healthy ? "healthy" : "not healthy"}` +
    (health.degraded.length ? `, sub-models nobody serves: ${health.degraded.join(", ")}` : "") +
    (health.error ? `, ${health.error}` : "");
}

function renderCameras(state) {
  const cards = state.cameras.map((camera) => {
    const latest = camera.latest;
    const card = el("div", { class: "card", "data-camera": camera.id },
      el("div", { class: "muted" }, `${camera.id}${camera.status ? ` · ${camera.status.state}` : ""}`));
    if (latest) {
      card.append(
        el("div", { class: "class" }, latest.class),
        el("div", {}, el("span", { class: "score" }, latest.score.toFixed(3)), " · ",
          el("span", { class: "latency" }, ms(latest.latency_ms)), ` · #${latest.seq}`),
        el("div", { class: latest.degraded ? "degraded" : "muted" },
          latest.degraded ? `degraded, missing ${latest.missing.join(", ")}` : "complete"));
      if (latest.untrained) {
        card.append(el("div", { class: "untrained" }, "untrained bundle: random weights"));
      }
    } else {
      card.append(el("div", { class: "muted" }, "no prediction yet"));
    }
    card.append(el("div", { class: "muted" }, `${camera.predictions} predictions`));
    if (state.frames_enabled && camera.frame_seq !== null) {
      const src = `/frames/${encodeURIComponent(camera.id)}?seq=${camera.frame_seq}`;
      card.append(el("img", { src, alt: `latest frame of ${camera.id}` }));
    }
    return card;
  });
  document.getElementById("cameras").replaceChildren(...cards);
  const framesSeen = state.cameras.some((camera) => camera.frame_seq !== null);
  document.getElementById("frames-note").textContent = !state.frames_enabled
    ? "frames are off (start with --frames, as an identity allowed to read them)"
    : framesSeen ? "" : "no frame yet: the broker sends frames only to an identity allowed to "
      + "read them (edvit secure init --dashboard-sees-frames)";
}

function renderAnswers(state) {
  const p = state.predictions;
  document.getElementById("degraded-rate").textContent =
    p.degraded_rate === null ? "–" : `${(100 * p.degraded_rate).toFixed(1)}%`;
  document.getElementById("degraded-detail").textContent =
    `(${p.degraded} of the last ${p.window}; ${p.seen} seen)`;
  document.getElementById("p50").textContent = ms(p.latency_ms.p50);
  document.getElementById("p95").textContent = ms(p.latency_ms.p95);
  const buckets = p.latency_ms.histogram;
  const most = Math.max(1, ...buckets.map((b) => b.count));
  document.getElementById("histogram").replaceChildren(...buckets.map((b) => {
    const label = b.le === null ? "more" : `≤${b.le}`;
    const bar = el("div", { class: "bar", title: `${b.count} predictions ${label} ms` });
    bar.style.height = `${(100 * b.count) / most}%`;
    return el("div", { class: "bucket", "data-le": b.le ?? "inf", "data-count": b.count },
      bar, el("span", { class: "label" }, label));
  }));
  fill(document.querySelector("#stages tbody"), state.stages.map((s) =>
    el("tr", { "data-stage": s.stage }, el("td", {}, s.stage), el("td", {}, s.mean_ms.toFixed(2)),
      el("td", {}, s.p50_ms.toFixed(2)), el("td", {}, s.p95_ms.toFixed(2)))));
  document.getElementById("stages-note").hidden = state.stages.length > 0;
}

function renderPlan(state) {
  const plan = state.plan;
  document.getElementById("plan-id").textContent = plan ? `plan ${short(plan.plan_id)}` : "no plan";
  fill(document.querySelector("#assignments tbody"), !plan ? [] :
    Object.entries(plan.assignments).map(([node, ids]) =>
      el("tr", {}, el("td", {}, node), el("td", {}, ids.join(", ") || "(nothing)"))));
  document.getElementById("plan-detail").textContent = !plan ? "no plan" :
    `${plan.plan_id}: ${plan.submodels.length} sub-models, ${plan.classes} classes` +
    (plan.sliced ? ", sliced" : "") + (plan.signed_by ? `, signed by ${plan.signed_by}` : "") +
    (plan.base_plan_id ? `, re-placed from ${plan.base_plan_id}` : "");
  document.getElementById("plan-history").replaceChildren(...state.plan_history.map((entry) =>
    el("li", {}, `${entry.plan_id} at ${new Date(entry.seen * 1000).toLocaleTimeString()}`)));
}

function render(state) {
  renderNodes(state);
  renderCameras(state);
  renderAnswers(state);
  renderPlan(state);
  const badge = document.getElementById("connection");
  const connected = state.broker ? state.broker.connected : true;
  badge.textContent = connected ? "live" : "broker lost";
  badge.className = `badge ${connected ? "ok" : "bad"}`;
  const bad = state.bad_payloads.total;
  document.getElementById("bad-payloads").textContent = bad ? `${bad} bad payloads` : "";
}

function disconnected() {
  const badge = document.getElementById("connection");
  badge.textContent = "dashboard lost";
  badge.className = "badge bad";
}

fetch("/api/state").then((r) => r.json()).then(render).catch(disconnected);
const events = new EventSource("/events");
events.onmessage = (event) => render(JSON.parse(event.data));
events.onerror = disconnected;
