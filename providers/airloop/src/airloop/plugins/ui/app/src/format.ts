/**
 * Numbers and times for people, as the server-rendered pages write them (``pages.py``): three
 * significant figures, whole numbers whole with separators, rates as percentages, times in the
 * timezone the user chose in Airflow's UI.
 */

// Metric names (their last word) that are shares of 1: shown as percentages.
const RATES = new Set(["accuracy", "agreement", "precision", "rate", "recall", "share"]);

export const isRate = (name: string): boolean =>
  RATES.has(name.toLowerCase().replaceAll(".", "_").split("_").at(-1) ?? "");

const three = (value: number): string => {
  const rounded = Number(value.toPrecision(3));
  if (Math.abs(rounded) >= 1000) {
    return Math.round(rounded).toLocaleString("en-US");
  }
  return rounded.toPrecision(3).replace(/\.$/u, "");
};

export const number = (value: number | null | undefined): string => {
  if (value === null || value === undefined || !Number.isFinite(value)) {
    return "–";
  }
  return Number.isInteger(value) ? value.toLocaleString("en-US") : three(value);
};

export const percent = (value: number | null | undefined): string =>
  value === null || value === undefined || !Number.isFinite(value) ? "–" : `${three(value * 100)} %`;

export const metric = (name: string, value: number | null | undefined): string =>
  isRate(name) ? percent(value) : number(value);

/** ``to`` against ``from``: percentage points for rates, else the plain difference; signed. */
export const change = (name: string, to: number | null, from: number | null): string | undefined => {
  if (to === null || from === null) {
    return undefined;
  }
  const delta = to - from;
  const sign = delta > 0 ? "+" : delta < 0 ? "−" : "±";
  const size = Math.abs(delta);
  if (isRate(name)) {
    return `${sign}${size === 0 ? "0" : three(size * 100)} pp`;
  }
  return `${sign}${size === 0 ? "0" : three(size)}`;
};

/** The timezone chosen in Airflow's UI (its local storage), else the browser's. */
export const userTimezone = (): string => {
  try {
    const stored = globalThis.localStorage.getItem("timezone");
    const zone = stored === null ? undefined : (JSON.parse(stored) as unknown);
    if (typeof zone === "string" && zone) {
      new Intl.DateTimeFormat("en-US", { timeZone: zone }); // throws on a name it does not know
      return zone;
    }
  } catch {
    // no storage, or a value that is not a timezone: the browser's
  }
  return Intl.DateTimeFormat().resolvedOptions().timeZone;
};

/** ``20260201T000000Z`` (drift report folders) as ISO; other strings as they are. */
const iso = (value: string): string =>
  value.replace(/^(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})(.*)$/u, "$1-$2-$3T$4:$5:$6$7");

/** A time (ISO string, report folder name or epoch milliseconds) as a date in the user's timezone. */
export const when = (value: number | string | null | undefined): string => {
  if (value === null || value === undefined || value === "") {
    return "–";
  }
  let text = typeof value === "string" ? iso(value) : "";
  // Naive times in reports are UTC.
  if (text && !/(Z|[+-]\d{2}:?\d{2})$/u.test(text)) {
    text += "Z";
  }
  const date = new Date(typeof value === "number" ? value : text);
  if (Number.isNaN(date.getTime())) {
    return String(value);
  }
  // Field by field: dateStyle cannot be combined with timeZoneName.
  return new Intl.DateTimeFormat("en-GB", {
    day: "numeric",
    hour: "2-digit",
    minute: "2-digit",
    month: "short",
    timeZone: userTimezone(),
    timeZoneName: "short",
    year: "numeric",
  }).format(date);
};
