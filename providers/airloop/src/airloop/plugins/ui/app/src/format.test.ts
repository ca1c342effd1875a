/** The app's numbers and times, as the server-rendered pages write them (node's test runner). */
import assert from "node:assert/strict";
import { afterEach, test } from "node:test";

import { change, isRate, metric, number, percent, when } from "./format.ts";

const stored = (zone: string | undefined) => {
  Reflect.set(globalThis, "localStorage", {
    getItem: (key: string) => (key === "timezone" && zone !== undefined ? JSON.stringify(zone) : null),
  });
};

afterEach(() => {
  Reflect.deleteProperty(globalThis, "localStorage");
});

test("three significant figures, whole numbers whole", () => {
  assert.equal(number(0.0360234998879605), "0.0360");
  assert.equal(number(12345), "12,345");
  assert.equal(number(1234.5), "1,230");
  assert.equal(number(2.5), "2.50");
  assert.equal(number(null), "–");
  assert.equal(number(Number.NaN), "–");
});

test("rates are percentages, their changes percentage points", () => {
  assert.ok(isRate("accuracy") && isRate("eval.error_rate") && isRate("agreement"));
  assert.ok(!isRate("log_loss") && !isRate("p99_ms"));
  assert.equal(metric("accuracy", 0.93), "93.0 %");
  assert.equal(percent(0.9999), "100 %");
  assert.equal(metric("log_loss", 0.25), "0.250");
  assert.equal(change("accuracy", 0.95, 0.93), "+2.00 pp");
  assert.equal(change("log_loss", 0.5, 0.75), "−0.250");
  assert.equal(change("accuracy", 0.9, 0.9), "±0 pp");
  assert.equal(change("accuracy", 0.9, null), undefined);
});

test("times in the timezone chosen in Airflow's UI; naive report times are UTC", () => {
  stored("UTC");
  assert.equal(when("20260201T000000Z"), "1 Feb 2026, 00:00 UTC");
  assert.equal(when("2026-02-01T00:10:00"), "1 Feb 2026, 00:10 UTC");
  assert.equal(when(1767225600000), "1 Jan 2026, 00:00 UTC");
  stored("Asia/Kolkata");
  assert.equal(when("2026-02-01T00:10:00+00:00"), "1 Feb 2026, 05:40 GMT+5:30");
  stored("Not/AZone");
  assert.match(when("2026-02-01T00:10:00Z"), /^1 Feb 2026, /u); // the browser's own zone
  assert.equal(when("soon"), "soon");
  assert.equal(when(null), "–");
});
