/* The shopper's page: search by photo, description or both; filters; "more like this".
 *
 * Plain browser JavaScript, no build step and no dependencies. Read top-down:
 *   1. the API calls (one function per route; photo + description is the server's hybrid
 *      `POST /search`, the one fusion),
 *   2. filters <-> query parameters / JSON body,
 *   3. running a search (busy indicator, errors, history / shareable URL),
 *   4. rendering results,
 *   5. the form: photo pick / drop / paste, filter menus from GET /attributes (whose keys
 *      are the filter names; the page keeps no field list of its own: `predicted.<field>`
 *      keys, values the fitted heads predicted from the photos, get menus marked
 *      "(predicted)"), events.
 */
"use strict";

(() => {
  const MAIN_FILTERS = ["category", "article_type", "colour", "gender", "size"];  // shown first
  const PAGE_PARAMS = ["q", "k", "similar"];  // the page's own URL parameters, not filters
  // How sure a prediction must be for the predicted.* menus to count it (the API's
  // predicted_confidence_min); offered once some product has a predicted value.
  const CONFIDENCE = "predicted_confidence_min";
  const CONFIDENCE_LEVELS = { 0.5: "at least 50% sure", 0.7: "at least 70% sure",
    0.9: "at least 90% sure" };
  const BUSY_MESSAGE = "The search service is busy or restarting, try again in a moment.";
  const TIMEOUT_MS = 30000;
  const DEFAULT_K = 12;
  const MAX_K = 100;

  const $ = (selector) => document.querySelector(selector);
  const els = {
    form: $("#search-form"), photoInput: $("#photo-input"), dropZone: $("#drop-zone"),
    preview: $("#photo-preview"), dropText: $("#drop-hint"), clearPhoto: $("#clear-photo"),
    query: $("#query"), k: $("#k"), priceMin: $("#price-min"), priceMax: $("#price-max"),
    filterGrid: $("#filter-grid"), filters: $("#filters"), clearFilters: $("#clear-filters"),
    error: $("#error"), busy: $("#busy"), summary: $("#summary"), similarTo: $("#similar-to"),
    results: $("#results"), resultsSection: $("#results-section"),
  };
  const dropTextDefault = els.dropText.innerHTML;  // static markup from index.html

  const state = {
    photo: null,        // the File being searched with, if any
    photoUrl: null,     // its object URL (preview)
    lastSpec: null,     // the last search run (re-run when filters change)
    seq: 0,             // increments per search; answers of superseded searches are dropped
    controller: null,   // aborts the search in flight when a newer one starts
    filterNames: null,  // Set of the filter names GET /attributes gave (null until loaded)
    searches: 0,        // completed searches (exposed for tests as data-search-count)
  };

  // 1. API ---------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  async function request(url, options = {}) {
    let response;
    try {
      response = await fetch(url, { headers: { accept: "application/json" }, ...options });
    } catch (exc) {
      if (exc.name === "AbortError") throw exc;
      throw new ApiError(0, "network", BUSY_MESSAGE);  // connection refused / reset
    }
    let body = null;
    try {
      body = await response.json();
    } catch {
      body = null;  // a proxy's HTML error page, or an empty body
    }
    if (!response.ok) {
      const error = (body && body.error) || {};
      throw new ApiError(response.status, error.code || `http_${response.status}`,
        error.message || response.statusText || `HTTP ${response.status}`);
    }
    return body;
  }

  const api = {
    attributes: (signal) => request("/attributes", { signal }),
    product: (id, signal) => request(`/products/${encodeURIComponent(id)}`, { signal }),
    similar: (id, k, filters, signal) =>
      request(`/products/${encodeURIComponent(id)}/similar?${queryParams(k, filters)}`, { signal }),
    image(file, k, filters, signal) {
      const form = new FormData();
      form.append("image", file, file.name || "photo");
      return request(`/search/image?${queryParams(k, filters)}`,
        { method: "POST", body: form, signal });
    },
    text: (query, k, filters, signal) => request("/search/text", {
      method: "POST", signal, headers: { "content-type": "application/json", accept: "application/json" },
      body: JSON.stringify({ query, k, filters: filterBody(filters) }),
    }),
    /* Photo and description together: the server fuses both searches (Milvus hybrid search,
     * reciprocal rank), so the page and the API rank alike. */
    hybrid(file, query, k, filters, signal) {
      const form = new FormData();
      form.append("image", file, file.name || "photo");
      form.append("query", query);
      return request(`/search?${queryParams(k, filters)}`, { method: "POST", body: form, signal });
    },
  };

  // 2. Filters: a list of [param, value] pairs, as in the page's URL ------------------------

  function queryParams(k, filters) {
    const params = new URLSearchParams({ k: String(k) });
    for (const [name, value] of filters) params.append(name, value);
    return params.toString();
  }

  /* The same filters as /search/text's JSON body (mirrors deployments/core/filters.py). */
  function filterBody(filters) {
    const body = {};
    for (const [name, value] of filters) {
      if (name === "price_min" || name === "price_max" || name === CONFIDENCE) {
        body[name] = Number(value);
      } else if (name.startsWith("attr.")) {
        const attributes = (body.attributes = body.attributes || {});
        (attributes[name.slice(5)] = attributes[name.slice(5)] || []).push(...scalars(value));
      } else if (name.startsWith("predicted.")) {
        const predicted = (body.predicted = body.predicted || {});
        (predicted[name.slice(10)] = predicted[name.slice(10)] || []).push(value);
      } else {
        (body[name] = body[name] || []).push(value);
      }
    }
    return body;
  }

  /* A query-string value matches the same text or the number / boolean it spells. */
  function scalars(value) {
    if (value === "true" || value === "false") return [value, value === "true"];
    const number = Number(value);
    return value.trim() !== "" && Number.isFinite(number) ? [value, number] : [value];
  }

  /* A URL parameter that filters: a name GET /attributes gave, any `attr.<name>` or
   * `predicted.<field>` (listed only while some product has one), a price bound; before (or
   * without) the attribute list, anything but the page's own parameters. */
  function isFilterParam(name) {
    if (name.startsWith("attr.") || name.startsWith("predicted.")) return true;
    if (name === "price_min" || name === "price_max" || name === CONFIDENCE) return true;
    return state.filterNames ? state.filterNames.has(name) : !PAGE_PARAMS.includes(name);
  }

  /* The field a filter name is about: `attr.material` -> material, `predicted.colour` ->
   * colour. */
  function fieldOf(param) {
    if (param.startsWith("attr.")) return param.slice(5);
    return param.startsWith("predicted.") ? param.slice(10) : param;
  }

  /* What a shopper reads: "Article type", "Colour (predicted)" (not the shop's own label). */
  function labelOf(param) {
    if (param === CONFIDENCE) return "Predictions";
    const words = fieldOf(param).replace(/_/g, " ");
    const label = words.charAt(0).toUpperCase() + words.slice(1);
    return param.startsWith("predicted.") ? `${label} (predicted)` : label;
  }

  function describeFilters(filters) {
    return filters.map(([name, value]) => {
      if (name === "price_min") return `price from ${value}`;
      if (name === "price_max") return `price up to ${value}`;
      if (name === CONFIDENCE) {
        return `predictions ${CONFIDENCE_LEVELS[value] || `at least ${value} sure`}`;
      }
      return `${labelOf(name).toLowerCase()}: ${value}`;
    }).join(", ");
  }

  // 3. Running a search --------------------------------------------------------------------

  /* spec: {mode: "text" | "photo" | "both" | "similar", text, photo, id, k, filters}.
   * history: "push" (a new search), "replace" (same search, other filters) or "none". */
  async function runSearch(spec, history = "push") {
    const seq = ++state.seq;
    if (state.controller) state.controller.abort();
    const controller = new AbortController();
    state.controller = controller;
    state.lastSpec = spec;
    let timedOut = false;
    const timer = setTimeout(() => { timedOut = true; controller.abort(); }, TIMEOUT_MS);
    updateUrl(spec, history);
    hideError();
    setBusy(true);
    try {
      const data = await perform(spec, controller.signal);
      if (seq !== state.seq) return;
      render(spec, data);
      els.results.dataset.state = "done";
    } catch (exc) {
      if (seq !== state.seq) return;  // a newer search replaced this one
      showError(messageFor(exc, spec, timedOut), isRetryable(exc, timedOut));
      clearResults("");
      if (spec.photo && spec.photo === state.photo && isPhotoProblem(exc)) setPhoto(null);
      els.results.dataset.state = "error";
    } finally {
      clearTimeout(timer);
      if (seq === state.seq) {
        setBusy(false);
        els.results.dataset.searchCount = String(++state.searches);
      }
    }
  }

  async function perform(spec, signal) {
    switch (spec.mode) {
      case "similar": {
        const [found, product] = await Promise.all([
          api.similar(spec.id, spec.k, spec.filters, signal),
          api.product(spec.id, signal),
        ]);
        return { ...found, product };
      }
      case "text":
        return api.text(spec.text, spec.k, spec.filters, signal);
      case "photo":
        return api.image(spec.photo, spec.k, spec.filters, signal);
      case "both":
        return api.hybrid(spec.photo, spec.text, spec.k, spec.filters, signal);
      default:
        throw new Error(`unknown search mode ${spec.mode}`);
    }
  }

  function sentence(text) {
    const trimmed = String(text || "").trim();
    if (!trimmed) return "Something went wrong.";
    const capital = trimmed.charAt(0).toUpperCase() + trimmed.slice(1);
    return /[.!?]$/.test(capital) ? capital : `${capital}.`;
  }

  function isBusy(exc, timedOut) {
    if (timedOut) return true;
    return exc instanceof ApiError && [0, 502, 503, 504].includes(exc.status);
  }

  /* The photo itself was refused (not an image, too large, unreadable): drop it from the form. */
  function isPhotoProblem(exc) {
    return exc instanceof ApiError && (exc.status === 413 || exc.status === 415
      || ["invalid_image", "empty_image"].includes(exc.code));
  }

  function isRetryable(exc, timedOut) {
    return isBusy(exc, timedOut) || (exc instanceof ApiError && exc.status >= 500);
  }

  /* A message a shopper understands, for every way a search can fail. */
  function messageFor(exc, spec, timedOut) {
    if (isBusy(exc, timedOut)) return BUSY_MESSAGE;
    if (!(exc instanceof ApiError)) return "Something went wrong in this page; reload it and try again.";
    const name = spec.photo && spec.photo.name ? spec.photo.name : "That file";
    if (exc.status === 415) {
      return `${name} can't be used: ${exc.message.replace(/[.]$/, "")}. Choose a product photo instead.`;
    }
    if (exc.code === "invalid_image") {
      return `${name} can't be used: ${exc.message.replace(/[.]$/, "")}.`;
    }
    if (exc.status === 413) {
      const size = spec.photo ? ` (${(spec.photo.size / 1048576).toFixed(1)} MB)` : "";
      return exc.code === "upload_too_large"
        ? `That photo is too large${size}. Pick a smaller photo, or a screenshot of it.`
        : `${sentence(exc.message)} Pick a smaller photo.`;
    }
    if (exc.status === 404 && spec.mode === "similar") {
      return `The product ${spec.id} is not in the catalogue (any more).`;
    }
    if (exc.status >= 500) return "Something went wrong in the search service; try again in a moment.";
    return sentence(exc.message);
  }

  function setBusy(on) {
    els.busy.hidden = !on;
    els.results.setAttribute("aria-busy", on ? "true" : "false");
    if (on) els.results.dataset.state = "loading";
  }

  function showError(message, retry = false) {
    els.error.replaceChildren(document.createTextNode(message));
    if (retry && state.lastSpec) {
      const again = document.createElement("button");
      again.type = "button";
      again.id = "retry";
      again.className = "link-button";
      again.textContent = "Try again";
      again.addEventListener("click", () => runSearch(state.lastSpec, "none"));
      els.error.append(" ", again);
    }
    els.error.hidden = false;
  }

  function hideError() {
    els.error.hidden = true;
    els.error.replaceChildren();
  }

  /* The URL of a search: text and product-id searches can be shared and reloaded. */
  function urlFor(spec) {
    const params = new URLSearchParams();
    if (spec.mode === "similar") params.set("similar", spec.id);
    else if (spec.text) params.set("q", spec.text);
    params.set("k", String(spec.k));
    for (const [name, value] of spec.filters) params.append(name, value);
    return `${location.pathname}?${params.toString()}`;
  }

  function updateUrl(spec, history) {
    if (history === "none") return;
    const url = urlFor(spec);
    const entry = { mode: spec.mode };
    if (history === "push" && url !== location.pathname + location.search) {
      window.history.pushState(entry, "", url);
    } else {
      window.history.replaceState(entry, "", url);
    }
  }

  // 4. Rendering ---------------------------------------------------------------------------

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  }

  function formatPrice(price) {
    const number = Number(price);
    return Number.isFinite(number) ? number.toFixed(2) : String(price);
  }

  function formatScore(score) {
    return typeof score === "number" ? score.toFixed(2) : "–";
  }

  function resultCard(item, spec) {
    const attributes = item.attributes || {};
    const li = element("li", "result");
    li.dataset.id = item.id;
    li.dataset.testid = "result";

    const link = element("a", "result-link");
    link.href = urlFor({ mode: "similar", id: item.id, k: spec.k, filters: spec.filters });
    link.title = "Show more like this";

    const figure = element("span", "result-photo");
    const img = element("img", "result-image");
    img.src = item.image_url;
    img.alt = "";  // the title is the link text
    img.loading = "lazy";
    img.decoding = "async";
    img.width = 300;
    img.height = 300;
    figure.append(img);

    const body = element("span", "result-body");
    body.append(element("span", "result-title", item.title));

    const facts = element("span", "result-facts");
    if (attributes.colour) {
      const colour = element("span", "result-colour");
      colour.dataset.value = attributes.colour;
      const swatch = element("span", "swatch");
      swatch.setAttribute("aria-hidden", "true");
      swatch.style.backgroundColor = String(attributes.colour).toLowerCase().replace(/\s+/g, "");
      colour.append(swatch, document.createTextNode(attributes.colour));
      facts.append(colour);
    }
    for (const [key, cls] of [["article_type", "result-type"], ["gender", "result-gender"],
      ["size", "result-size"]]) {
      if (attributes[key]) {
        const fact = element("span", cls, attributes[key]);
        fact.dataset.value = attributes[key];
        facts.append(fact);
      }
    }
    const predicted = item.predicted || {};
    for (const key of ["colour", "article_type", "gender"]) {
      const guess = predicted[key];
      if (attributes[key] || !guess) continue;
      const fact = element("span", "result-predicted",
        `${guess.value}? predicted ${Math.round(guess.confidence * 100)}%`);
      fact.dataset.field = key;
      fact.dataset.value = guess.value;
      fact.title = "Predicted from the photo (heads fitted on this catalogue), not the shop's "
        + "own label";
      facts.append(fact);
    }
    if (item.found_by === "photo") {  // fitted heads: found by its pixels, not its words
      const badge = element("span", "result-found-by", "found by its photo");
      badge.title = "Its title does not match your words; its photo does";
      facts.append(badge);
    }
    body.append(facts);

    const footer = element("span", "result-footer");
    if (attributes.price !== undefined && attributes.price !== null) {
      const price = element("span", "result-price", formatPrice(attributes.price));
      price.dataset.value = String(attributes.price);
      price.prepend(element("span", "visually-hidden", "Price "));
      footer.append(price);
    }
    const score = element("span", "result-score");
    score.title = "The score this list is ranked by: higher ranks first (1 is the best)";
    if (spec.mode === "both") {
      score.title = "Photo and description fused by rank (reciprocal rank fusion): higher is "
        + "closer to both";
      score.textContent = `photo + text ${typeof item.score === "number"
        ? item.score.toFixed(3) : "–"}`;
    } else {
      score.textContent = `score ${formatScore(item.score)}`;
    }
    if (typeof item.score === "number") score.dataset.value = String(item.score);
    footer.append(score);
    body.append(footer, element("span", "result-more", "More like this →"));

    link.append(figure, body);
    li.append(link);
    return li;
  }

  function render(spec, data) {
    const results = data.results || [];
    els.results.replaceChildren(...results.map((item) => resultCard(item, spec)));
    renderSimilarTo(spec, data.product);

    const count = results.length;
    const noun = count === 1 ? "product" : "products";
    let what;
    if (spec.mode === "text") what = `${count} ${noun} for “${spec.text}”`;
    else if (spec.mode === "photo") what = `${count} ${noun} that look like your photo`;
    else if (spec.mode === "both") what = `${count} ${noun} for your photo and “${spec.text}”`;
    else what = `${count} ${noun} like ${data.product ? data.product.title : spec.id}`;
    const filters = spec.filters.length ? ` (${describeFilters(spec.filters)})` : "";
    els.summary.textContent = count
      ? `${what}${filters}`
      : `No products found${filters}.${spec.filters.length ? " Try removing a filter." : ""}`;
    if (typeof data.took_ms === "number") {
      els.summary.append(element("small", "took", ` in ${Math.round(data.took_ms)} ms`));
    }
    document.title = spec.mode === "text" || spec.mode === "both"
      ? `${spec.text} – Find similar products`
      : spec.mode === "similar" ? `More like ${data.product ? data.product.title : spec.id}`
        : "Find similar products";
  }

  function renderSimilarTo(spec, product) {
    if (spec.mode !== "similar" || !product) {
      els.similarTo.hidden = true;
      els.similarTo.replaceChildren();
      return;
    }
    const img = element("img", "similar-image");
    img.src = product.image_url;
    img.alt = "";
    const text = element("span", "similar-text");
    text.append(element("span", "similar-label", "More like this"),
      element("strong", "similar-title", product.title));
    els.similarTo.replaceChildren(img, text);
    els.similarTo.dataset.id = product.id;
    els.similarTo.hidden = false;
  }

  function clearResults(summary) {
    els.results.replaceChildren();
    els.similarTo.hidden = true;
    els.similarTo.replaceChildren();
    els.summary.textContent = summary;
  }

  // 5. The form ----------------------------------------------------------------------------

  function readK() {
    const k = Number.parseInt(els.k.value, 10);
    return Number.isInteger(k) && k >= 1 && k <= MAX_K ? k : DEFAULT_K;
  }

  function setK(value) {
    const k = Number.parseInt(value, 10);
    const valid = Number.isInteger(k) && k >= 1 && k <= MAX_K ? k : DEFAULT_K;
    if (![...els.k.options].some((o) => o.value === String(valid))) {
      const option = new Option(String(valid), String(valid));
      const after = [...els.k.options].find((o) => Number(o.value) > valid);
      els.k.add(option, after || null);
    }
    els.k.value = String(valid);
  }

  function filterSelects() {
    return [...els.filters.querySelectorAll("select[data-param]")];
  }

  function readFilters() {
    const filters = [];
    for (const select of filterSelects()) {
      if (select.value) filters.push([select.dataset.param, select.value]);
    }
    for (const [input, name] of [[els.priceMin, "price_min"], [els.priceMax, "price_max"]]) {
      const value = input.value.trim();
      if (value !== "" && Number.isFinite(Number(value)) && Number(value) >= 0) {
        filters.push([name, value]);
      }
    }
    return filters;
  }

  /* One menu per filterable field; `values` maps value -> count. Ids: #filter-colour,
   * #filter-material (attr.material), #filter-predicted-colour (predicted.colour); a name
   * that would take an id already used by another field (`attr.colour` beside `colour`)
   * gets a numbered one (#filter-colour-2), so each label points at its own menu. */
  function ensureSelect(param, values = {}) {
    let select = [...document.querySelectorAll("select[data-param]")]
      .find((other) => other.dataset.param === param);
    if (!select) {
      const prefix = param.startsWith("predicted.") ? "filter-predicted-" : "filter-";
      const base = `${prefix}${fieldOf(param).replace(/[^A-Za-z0-9_-]/g, "_")}`;
      let id = base;
      for (let n = 2; document.getElementById(id); n += 1) id = `${base}-${n}`;
      const field = element("div", "field");
      if (param.startsWith("predicted.") || param === CONFIDENCE) {
        field.classList.add("predicted-field");
        field.title = "Predicted from the photos (heads fitted on this catalogue), not the "
          + "shop's own labels";
      }
      const label = element("label", null, labelOf(param));
      label.htmlFor = id;
      select = element("select", "filter-select");
      select.id = id;
      select.name = param;
      select.dataset.param = param;
      select.dataset.testid = id;
      field.append(label, select);
      const main = MAIN_FILTERS.includes(param);
      if (main) {
        const before = [...els.filterGrid.children].find((child) => {
          const other = child.querySelector("select[data-param]");
          return !other || MAIN_FILTERS.indexOf(other.dataset.param) > MAIN_FILTERS.indexOf(param);
        });
        els.filterGrid.insertBefore(field, before || null);
      } else {
        moreFiltersGrid().append(field);
      }
    }
    if (param === CONFIDENCE) values = CONFIDENCE_LEVELS;  // fixed levels, not counts
    const current = select.value;
    const entries = Object.entries(values).sort(([a], [b]) =>
      a.localeCompare(b, undefined, { numeric: true, sensitivity: "base" }));
    const options = [new Option("Any", "")];
    for (const [value, count] of entries) {
      options.push(new Option(param === CONFIDENCE ? count : `${value} (${count})`, value));
    }
    if (current && !(current in values)) options.push(new Option(current, current));
    select.replaceChildren(...options);
    select.value = current;
    return select;
  }

  function moreFiltersGrid() {
    let details = document.getElementById("more-filters");
    if (!details) {
      details = element("details", "more-filters");
      details.id = "more-filters";
      details.append(element("summary", null, "More filters"), element("div", "filter-grid"));
      els.clearFilters.before(details);
    }
    return details.querySelector(".filter-grid");
  }

  async function loadAttributes() {
    try {
      const fields = await api.attributes();  // filter name -> {value: count}
      state.filterNames = new Set(Object.keys(fields));
      for (const param of MAIN_FILTERS) {
        if (fields[param] && Object.keys(fields[param]).length) ensureSelect(param, fields[param]);
      }
      for (const [param, values] of Object.entries(fields)) {
        if (MAIN_FILTERS.includes(param) || Object.keys(values).length < 2) continue;
        ensureSelect(param, values);
      }
      if (Object.keys(fields).some((param) => param.startsWith("predicted."))) {
        ensureSelect(CONFIDENCE);
      }
      els.filters.dataset.loaded = "true";
    } catch (exc) {
      els.filters.dataset.loaded = "error";
      showError(isBusy(exc, false) ? `Filters could not be loaded. ${BUSY_MESSAGE}`
        : `Filters could not be loaded: ${sentence(exc.message)}`);
    }
  }

  function setFilterValue(param, value) {
    const select = ensureSelect(param);
    if (![...select.options].some((o) => o.value === value)) select.add(new Option(value, value));
    select.value = value;  // menus choose one value per field
  }

  /* Fill the form (text, k, filters) from the URL; returns its parameters. */
  function fillFormFromUrl() {
    const params = new URLSearchParams(location.search);
    els.query.value = params.get("q") || "";
    setK(params.get("k"));
    for (const select of filterSelects()) select.value = "";
    els.priceMin.value = "";
    els.priceMax.value = "";
    for (const [name, value] of params) {
      if (!isFilterParam(name)) continue;
      if (name === "price_min") els.priceMin.value = value;
      else if (name === "price_max") els.priceMax.value = value;
      else setFilterValue(name, value);
    }
    return params;
  }

  /* Fill the form from the URL and run the search it describes (if any). */
  function restoreFromUrl(history) {
    const params = fillFormFromUrl();
    const similar = params.get("similar");
    const text = els.query.value.trim();
    if (similar) {
      runSearch({ mode: "similar", id: similar, k: readK(), filters: readFilters() }, history);
    } else if (text) {
      runSearch({ mode: "text", text, photo: null, k: readK(), filters: readFilters() }, history);
    } else {
      state.lastSpec = null;
      if (history === "none") hideError();  // at start, keep a "filters could not load" error
      clearResults("Results will appear here.");
    }
  }

  /* The search the form describes now, or null when it has neither photo nor text. */
  function specFromForm() {
    const text = els.query.value.trim();
    const photo = state.photo;
    if (!text && !photo) return null;
    const mode = text && photo ? "both" : photo ? "photo" : "text";
    return { mode, text, photo, k: readK(), filters: readFilters() };
  }

  function searchFromForm(history = "push") {
    const spec = specFromForm();
    if (!spec) {
      showError("Choose or drop a photo, or type a description, then search.");
      els.query.focus();
      return;
    }
    runSearch(spec, history);
  }

  function setPhoto(file) {
    if (state.photoUrl) URL.revokeObjectURL(state.photoUrl);
    state.photo = file;
    state.photoUrl = null;
    if (!file) {
      els.preview.hidden = true;
      els.preview.removeAttribute("src");
      els.clearPhoto.hidden = true;
      els.dropZone.classList.remove("has-photo");
      els.dropText.innerHTML = dropTextDefault;
      return;
    }
    state.photoUrl = URL.createObjectURL(file);
    els.preview.src = state.photoUrl;
    els.preview.hidden = false;
    els.clearPhoto.hidden = false;
    els.dropZone.classList.add("has-photo");
    const name = element("span", "photo-name", file.name || "Pasted photo");
    els.dropText.replaceChildren(name, element("small", null, "Choose or drop another photo"));
  }

  function usePhoto(file) {
    if (!file) return;
    if (file.type && !file.type.startsWith("image/")) {
      setPhoto(null);
      showError(`${file.name || "That file"} is not a photo. Pick a JPEG, PNG, WEBP or GIF image.`);
      return;
    }
    setPhoto(file);
    searchFromForm();
  }

  /* Dropping a result's photo on the drop zone asks for more like that product. */
  function productIdFromDrop(dataTransfer) {
    const uri = dataTransfer.getData("text/uri-list") || dataTransfer.getData("text/plain");
    if (!uri) return null;
    try {
      const url = new URL(uri.split("\n")[0].trim(), location.href);
      const match = url.origin === location.origin && url.pathname.match(/^\/images\/([^/]+)$/);
      return match ? decodeURIComponent(match[1]) : null;
    } catch {
      return null;
    }
  }

  function bindEvents() {
    els.form.addEventListener("submit", (event) => {
      event.preventDefault();
      searchFromForm();
    });

    els.photoInput.addEventListener("change", () => {
      const file = els.photoInput.files && els.photoInput.files[0];
      els.photoInput.value = "";  // choosing the same file again fires `change` again
      usePhoto(file);
    });
    els.clearPhoto.addEventListener("click", () => {
      setPhoto(null);
      els.photoInput.focus();
    });
    els.preview.addEventListener("error", () => { els.preview.hidden = true; });

    // Drop anywhere on the page; the drop zone lights up while a file is dragged over it.
    let dragDepth = 0;
    document.addEventListener("dragenter", (event) => {
      event.preventDefault();
      dragDepth += 1;
      els.dropZone.classList.add("dragging");
    });
    document.addEventListener("dragleave", () => {
      dragDepth = Math.max(0, dragDepth - 1);
      if (!dragDepth) els.dropZone.classList.remove("dragging");
    });
    document.addEventListener("dragover", (event) => event.preventDefault());
    document.addEventListener("drop", (event) => {
      event.preventDefault();
      dragDepth = 0;
      els.dropZone.classList.remove("dragging");
      const file = event.dataTransfer.files && event.dataTransfer.files[0];
      if (file) {
        usePhoto(file);
        return;
      }
      const id = productIdFromDrop(event.dataTransfer);
      if (id) runSearch({ mode: "similar", id, k: readK(), filters: readFilters() });
    });
    document.addEventListener("paste", (event) => {
      const file = [...(event.clipboardData ? event.clipboardData.files : [])]
        .find((f) => f.type.startsWith("image/"));
      if (file) {
        event.preventDefault();
        usePhoto(file);
      }
    });

    // Changing a filter or the number of results re-runs the current search.
    const rerun = () => {
      const last = state.lastSpec;
      if (!last) return;
      if (last.mode === "similar") {
        runSearch({ ...last, k: readK(), filters: readFilters() }, "replace");
      } else {
        searchFromForm("replace");
      }
    };
    els.filters.addEventListener("change", rerun);
    els.clearFilters.addEventListener("click", () => {
      for (const select of filterSelects()) select.value = "";
      els.priceMin.value = "";
      els.priceMax.value = "";
      rerun();
    });

    // A result is a link to its "more like this" URL; a plain click loads it in place.
    els.results.addEventListener("click", (event) => {
      const link = event.target.closest("a.result-link");
      if (!link || event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey
          || event.altKey) return;
      event.preventDefault();
      const id = link.closest(".result").dataset.id;
      runSearch({ mode: "similar", id, k: readK(), filters: readFilters() });
      els.resultsSection.focus({ preventScroll: true });
      els.resultsSection.scrollIntoView({ block: "start", behavior: "smooth" });
    });

    $("#home-link").addEventListener("click", (event) => {
      event.preventDefault();
      window.history.pushState({}, "", "/");
      setPhoto(null);
      restoreFromUrl("none");
      els.query.focus();
    });

    window.addEventListener("popstate", (event) => {
      const mode = event.state && event.state.mode;
      if ((mode === "photo" || mode === "both") && state.photo) {
        // Photos are not in the URL; going back to a photo search re-runs it with the photo held.
        fillFormFromUrl();
        searchFromForm("none");
        return;
      }
      restoreFromUrl("none");
    });
  }

  async function init() {
    bindEvents();
    await loadAttributes();
    restoreFromUrl("replace");
    document.documentElement.dataset.ready = "true";
  }

  init();
})();
