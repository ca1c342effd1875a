/**
 * Builds the Airloop app as one UMD file that Airflow's UI imports (``react_apps``' bundle_url): it
 * sets ``globalThis.AirflowPlugin`` to the app's component. React, its JSX runtime and Chakra UI are
 * the host's (Airflow's UI puts them on globalThis), so the app renders in Airflow's own theme and
 * React tree; TanStack Query is bundled.
 */
import react from "@vitejs/plugin-react";
import { resolve } from "node:path";
import { defineConfig } from "vite";

export default defineConfig({
  build: {
    emptyOutDir: true,
    lib: {
      entry: resolve(import.meta.dirname, "src/main.tsx"),
      fileName: () => "airloop.js",
      formats: ["umd"],
      name: "AirflowPlugin",
    },
    outDir: resolve(import.meta.dirname, "../static"),
    rollupOptions: {
      external: ["react", "react-dom", "react/jsx-runtime", "@chakra-ui/react"],
      output: {
        globals: {
          "@chakra-ui/react": "ChakraUI",
          react: "React",
          "react-dom": "ReactDOM",
          "react/jsx-runtime": "ReactJSXRuntime",
        },
      },
    },
  },
  define: { "process.env.NODE_ENV": JSON.stringify("production") },
  plugins: [react()],
});
