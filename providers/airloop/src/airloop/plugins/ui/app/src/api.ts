/**
 * The provider's data API (``/airloop/api``, the plugin's FastAPI app), as the Models app reads it.
 * Types mirror ``airloop.plugins.ui.sources``; requests carry Airflow's session cookie.
 */

export type Problem = { detail: string; service: string };

export type VersionRecord = {
  aliases: string[];
  created: number | null; // MLflow's epoch milliseconds
  dag_run: { dag_id: string; run_id: string } | null;
  metrics: Record<string, number>;
  mlflow_run_url: string | null;
  mlflow_version_url: string;
  rejected: boolean;
  status: string;
  version: string;
};

export type Headline = {
  challenger: number | null;
  champion: number | null;
  metric: string;
  previous: number | null;
};

export type Predictor = {
  accuracy: number | null;
  errors: number | null;
  healthy: boolean;
  model_version: string;
  requests: number | null;
  shadow: boolean;
  weight: number;
};

export type ServingStatus = {
  deployed: boolean;
  deployment: string;
  note: string | null;
  predictors: Record<string, Predictor>;
  problem: Problem | null;
  target: string;
};

export type RolloutSummary = {
  challenger: string | null;
  champion: string | null;
  decision: string | null;
  deployment: string;
  ended: string | null;
  file: string;
  in_progress: boolean;
  phase: string | null;
  started: string | null;
  steps: { kind: string; verdict: string | null; weight: number | null }[];
};

export type DriftSummary = { at: string; has_html: boolean; severity: string | null; verdict: string | null };

export type LoopCard = {
  challenger: VersionRecord | null;
  champion: VersionRecord | null;
  description: string;
  drift: DriftSummary | null;
  headline: Headline | null;
  model_name: string;
  rollout: RolloutSummary | null;
  serving: ServingStatus | null;
};

export type LoopsView = { loops: LoopCard[]; problems: Problem[] };

/** A request the API refused: a service down (503 names it), no session (401/403), anything else. */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly problem: Problem,
  ) {
    super(`${problem.service}: ${problem.detail}`);
  }
}

/** Where Airflow is served (its page's ``<base href>``, i.e. ``[api] base_url``), ending in "/". */
export const airflowBase = (): URL => new URL(document.baseURI);

/** A path of the plugin's app (``models``, ``files/...``) under Airflow's base URL. */
export const airloopUrl = (path: string): string => new URL(`airloop/${path}`, airflowBase()).href;

export const fetchApi = async <T>(path: string): Promise<T> => {
  const response = await fetch(airloopUrl(`api/${path}`), {
    credentials: "same-origin",
    headers: { Accept: "application/json" },
  });
  if (!response.ok) {
    const body = (await response.json().catch(() => ({}))) as Partial<Problem>;
    const auth = response.status === 401 || response.status === 403;
    const service = body.service ?? (auth ? "Airflow login" : "Airloop");
    throw new ApiError(response.status, { detail: body.detail ?? response.statusText, service });
  }
  return (await response.json()) as T;
};
