/**
 * The Airloop app: the component Airflow's UI renders for the ``react_apps`` entry (at
 * ``/plugin/airloop``), inside its own React tree and Chakra theme.
 */
import { QueryClient, QueryClientProvider } from "@tanstack/react-query";
import { useState } from "react";

import { ModelsPage } from "./ModelsPage";

const AirloopApp = () => {
  // One client per mounted app: nothing cached outlives it.
  const [client] = useState(
    () => new QueryClient({ defaultOptions: { queries: { refetchOnWindowFocus: false, retry: false } } }),
  );
  return (
    <QueryClientProvider client={client}>
      <ModelsPage />
    </QueryClientProvider>
  );
};

export default AirloopApp;
