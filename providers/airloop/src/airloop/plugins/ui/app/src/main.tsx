/**
 * The Airloop app: the component Airflow's UI renders for the ``react_apps`` entry (at
 * ``/plugin/airloop``), inside its own React tree and Chakra theme.
 */
import { QueryClient, QueryClientProvider } from "@tanstack/react-query";
import { Component, type ReactNode, useState } from "react";

import { Banner, ModelsPage } from "./ModelsPage";

/** A page that fails to render is a banner inside the app; Airflow's navigation stays. */
class Failsafe extends Component<{ readonly children: ReactNode }, { error: Error | undefined }> {
  state = { error: undefined };

  static getDerivedStateFromError(error: Error) {
    return { error };
  }

  render() {
    const { error } = this.state as { error: Error | undefined };
    if (error === undefined) {
      return this.props.children;
    }
    return <Banner problem={{ detail: error.message, service: "Airloop" }} title="The page failed to render" />;
  }
}

const AirloopApp = () => {
  // One client per mounted app: nothing cached outlives it.
  const [client] = useState(
    () => new QueryClient({ defaultOptions: { queries: { refetchOnWindowFocus: false, retry: false } } }),
  );
  return (
    <Failsafe>
      <QueryClientProvider client={client}>
        <ModelsPage />
      </QueryClientProvider>
    </Failsafe>
  );
};

export default AirloopApp;
