// The browser tests' host page: one self-contained HTML file, tests/browser/host/dist/host.html (or $HOST_OUT_DIR).
import { resolve } from "node:path";
import { defineConfig } from "vite";
import { viteSingleFile } from "vite-plugin-singlefile";

const here = import.meta.dirname;

export default defineConfig({
  root: here,
  base: "./",
  logLevel: "warn",
  plugins: [viteSingleFile({ removeViteModuleLoader: true, outputFileName: "host.html" })],
  build: {
    outDir: process.env.HOST_OUT_DIR || resolve(here, "../../tests/browser/host/dist"),
    emptyOutDir: true,
    target: "es2022",
    minify: false,
    sourcemap: false,
    modulePreload: false,
    reportCompressedSize: false,
  },
});
