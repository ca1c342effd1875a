/**
 * Models: one card per loop (registered model): champion and challenger with the headline metric and
 * its change, the live traffic split, the rollout under way (or the last one) and the latest drift
 * verdict. A backing service that does not answer is a banner, never a stack trace.
 */
import { Alert, Badge, Box, Card, Flex, Heading, HStack, Link, SimpleGrid, Spinner, Stack, Text } from "@chakra-ui/react";
import { useQuery } from "@tanstack/react-query";

import {
  ApiError,
  airloopUrl,
  fetchApi,
  type DriftSummary,
  type Headline,
  type LoopCard,
  type LoopsView,
  type Problem,
  type RolloutSummary,
  type ServingStatus,
  type VersionRecord,
} from "./api";
import { change, metric, percent, when } from "./format";

// How often the cards follow the loop (a rollout moves traffic every analysis window).
const REFRESH_MS = 15_000;

const VERDICT_PALETTE: Record<string, string> = {
  approved: "green",
  awaiting: "orange",
  drift: "red",
  error: "red",
  fail: "red",
  no_drift: "green",
  pass: "green",
  promoted: "green",
  rejected: "red",
  rolled_back: "red",
};

const Verdict = ({ value }: { readonly value: string | null }) => (
  <Badge colorPalette={VERDICT_PALETTE[value ?? ""] ?? "gray"} variant="subtle">
    {value ?? "open"}
  </Badge>
);

export const Banner = ({ problem, title }: { readonly problem: Problem; readonly title?: string }) => (
  <Alert.Root data-testid="airloop-banner" status="error">
    <Alert.Indicator />
    <Alert.Content>
      <Alert.Title>{title ?? `${problem.service} does not answer`}</Alert.Title>
      <Alert.Description>{problem.detail}</Alert.Description>
    </Alert.Content>
  </Alert.Root>
);

const versionPage = (model: string, version: string) =>
  airloopUrl(`models/${encodeURIComponent(model)}/versions/${encodeURIComponent(version)}`);

const VersionLine = ({
  comparedTo,
  headline,
  model,
  role,
  value,
  version,
}: {
  readonly comparedTo: string;
  readonly headline: Headline | null;
  readonly model: string;
  readonly role: "challenger" | "champion";
  readonly value: number | null;
  readonly version: VersionRecord | null;
}) => {
  if (version === null) {
    return (
      <Text color="fg.muted" data-testid={`airloop-${role}`}>
        No {role}
      </Text>
    );
  }
  const reference = role === "champion" ? headline?.previous : headline?.champion;
  const delta = headline === null ? undefined : change(headline.metric, value, reference ?? null);
  return (
    <HStack data-testid={`airloop-${role}`} gap={3} wrap="wrap">
      <Badge colorPalette={role === "champion" ? "blue" : "purple"}>{role}</Badge>
      <Link color="fg.info" fontWeight="bold" href={versionPage(model, version.version)}>
        version {version.version}
      </Link>
      {version.rejected ? <Badge colorPalette="red">rejected</Badge> : undefined}
      {headline === null ? undefined : (
        <Text>
          {headline.metric} <strong>{metric(headline.metric, value)}</strong>
          {delta === undefined ? undefined : (
            <Text as="span" color="fg.muted">
              {" "}
              ({delta} vs {comparedTo})
            </Text>
          )}
        </Text>
      )}
      <Link color="fg.info" fontSize="sm" href={version.mlflow_version_url} rel="noreferrer" target="_blank">
        MLflow
      </Link>
    </HStack>
  );
};

const SEGMENT_PALETTE = ["blue.solid", "purple.solid", "teal.solid", "orange.solid"];

/** The live traffic split of a deployment as one bar, a segment per predictor (shadows mirror only). */
const TrafficSplit = ({ card, serving }: { readonly card: LoopCard; readonly serving: ServingStatus | null }) => {
  if (serving === null) {
    return <Text color="fg.muted">Not rolled out yet</Text>;
  }
  if (serving.note !== null) {
    return <Text color="fg.muted">Not served now: {serving.note}</Text>;
  }
  if (!serving.deployed) {
    return <Text color="fg.muted">The serving target does not answer (see the banner)</Text>;
  }
  const live = Object.entries(serving.predictors).filter(([, predictor]) => !predictor.shadow && predictor.weight > 0);
  const role = (version: string) =>
    version === card.champion?.version ? " champion" : version === card.challenger?.version ? " challenger" : "";
  const label = live.map(([, p]) => `version ${p.model_version}${role(p.model_version)} ${p.weight} %`).join(", ");
  return (
    <Stack gap={1}>
      <Flex
        aria-label={`Traffic split: ${label}`}
        borderRadius="md"
        data-testid="airloop-traffic"
        h={6}
        overflow="hidden"
        role="img"
        w="full"
      >
        {live.map(([name, predictor], index) => (
          <Box
            alignItems="center"
            bg={SEGMENT_PALETTE[index % SEGMENT_PALETTE.length]}
            color="white"
            display="flex"
            fontSize="xs"
            justifyContent="center"
            key={name}
            px={1}
            title={`${name}: version ${predictor.model_version}`}
            w={`${predictor.weight}%`}
          >
            v{predictor.model_version} {predictor.weight} %
          </Box>
        ))}
      </Flex>
      <Text color="fg.muted" fontSize="sm">
        {Object.entries(serving.predictors)
          .map(([name, p]) => {
            const counts = p.requests === null ? "" : `, ${p.requests} requests, ${p.errors ?? 0} errors`;
            const accuracy = p.accuracy === null ? "" : `, live accuracy ${percent(p.accuracy)}`;
            return `${name}${p.shadow ? " (shadow)" : ""}${p.healthy ? "" : " (unhealthy)"}${counts}${accuracy}`;
          })
          .join("; ")}{" "}
        · {serving.target} target
        {serving.problem === null ? "" : " · as it last reported: it does not answer now"}
      </Text>
    </Stack>
  );
};

const Rollout = ({ rollout }: { readonly rollout: RolloutSummary | null }) => {
  if (rollout === null) {
    return undefined;
  }
  const current = rollout.steps.at(-1);
  return (
    <Stack data-testid="airloop-rollout" gap={1}>
      <HStack gap={2} wrap="wrap">
        <Text fontWeight="semibold">{rollout.in_progress ? "Rollout in progress" : "Last rollout"}</Text>
        <Text>
          version {rollout.challenger ?? "?"} against {rollout.champion === null ? "no champion" : `version ${rollout.champion}`}:
        </Text>
        {rollout.in_progress ? (
          <Badge colorPalette="orange">
            {rollout.phase}
            {current === undefined ? "" : `, ${current.kind} ${current.weight ?? 0} %`}
          </Badge>
        ) : (
          <Verdict value={rollout.decision ?? rollout.phase} />
        )}
        <Text color="fg.muted" fontSize="sm">
          {when(rollout.started)}
        </Text>
        <Link color="fg.info" fontSize="sm" href={airloopUrl("rollouts")}>
          report
        </Link>
      </HStack>
      {rollout.steps.length > 0 ? (
        <HStack gap={1} wrap="wrap">
          {rollout.steps.map((step, index) => (
            // A step has no identity but its place in the timeline.
            <HStack gap={1} key={index}>
              <Text fontSize="sm">
                {step.kind} {step.weight ?? 0} %
              </Text>
              <Verdict value={step.verdict} />
            </HStack>
          ))}
        </HStack>
      ) : undefined}
    </Stack>
  );
};

const Drift = ({ drift, model }: { readonly drift: DriftSummary | null; readonly model: string }) => (
  <HStack data-testid="airloop-drift" gap={2} wrap="wrap">
    <Text fontWeight="semibold">Drift</Text>
    {drift === null ? (
      <Text color="fg.muted">no report yet</Text>
    ) : (
      <>
        <Verdict value={drift.verdict} />
        {drift.severity === null ? undefined : <Text fontSize="sm">severity {drift.severity}</Text>}
        <Text color="fg.muted" fontSize="sm">
          {when(drift.at)}
        </Text>
        <Link
          color="fg.info"
          fontSize="sm"
          href={
            drift.has_html
              ? airloopUrl(`files/drift/${encodeURIComponent(model)}/${encodeURIComponent(drift.at)}/report.html`)
              : airloopUrl("drift")
          }
        >
          report
        </Link>
      </>
    )}
  </HStack>
);

const LoopCardView = ({ card }: { readonly card: LoopCard }) => (
  <Card.Root data-model={card.model_name} data-testid="airloop-card" variant="outline">
    <Card.Header>
      <Heading size="md">{card.model_name}</Heading>
      {card.description ? <Text color="fg.muted">{card.description}</Text> : undefined}
    </Card.Header>
    <Card.Body>
      <Stack gap={3}>
        <VersionLine
          comparedTo="the previous champion"
          headline={card.headline}
          model={card.model_name}
          role="champion"
          value={card.headline?.champion ?? null}
          version={card.champion}
        />
        <VersionLine
          comparedTo="champion"
          headline={card.headline}
          model={card.model_name}
          role="challenger"
          value={card.headline?.challenger ?? null}
          version={card.challenger}
        />
        <TrafficSplit card={card} serving={card.serving} />
        <Rollout rollout={card.rollout} />
        <Drift drift={card.drift} model={card.model_name} />
      </Stack>
    </Card.Body>
  </Card.Root>
);

export const ModelsPage = () => {
  const { data, error, isPending } = useQuery({
    queryFn: () => fetchApi<LoopsView>("loops"),
    queryKey: ["airloop", "loops"],
    refetchInterval: REFRESH_MS,
  });
  const failure =
    error === null
      ? undefined
      : error instanceof ApiError
        ? error.problem
        : { detail: String(error), service: "Airloop" };
  return (
    <Box p={2}>
      <HStack justify="space-between" mb={4}>
        <Heading size="lg">Models</Heading>
        <Link color="fg.info" fontSize="sm" href={airloopUrl("models")}>
          All versions
        </Link>
      </HStack>
      <Stack gap={2} mb={4}>
        {failure === undefined ? undefined : (
          <Banner
            problem={failure}
            title={
              error instanceof ApiError && (error.status === 401 || error.status === 403)
                ? "Your Airflow session has ended: reload the page to log in again"
                : undefined
            }
          />
        )}
        {data?.problems.map((problem) => <Banner key={`${problem.service}:${problem.detail}`} problem={problem} />)}
      </Stack>
      {isPending ? <Spinner /> : undefined}
      {data !== undefined && data.loops.length === 0 ? (
        <Text color="fg.muted">No registered models yet: run the loop once (`airloop loop`).</Text>
      ) : undefined}
      <SimpleGrid columns={{ base: 1, xl: 2 }} gap={4}>
        {data?.loops.map((card) => <LoopCardView card={card} key={card.model_name} />)}
      </SimpleGrid>
    </Box>
  );
};
