// The run view: one self-contained HTML file (JS and CSS inlined), written to $UI_OUT_DIR (default ui/dist/)
// as run_view.html. scripts/build_ui.sh copies it to server/code_interpreter_mcp/app/static/.
import { defineConfig } from "vite";
import { viteSingleFile } from "vite-plugin-singlefile";

export default defineConfig({
  root: import.meta.dirname,
  base: "./",
  logLevel: "warn",
  plugins: [viteSingleFile({ removeViteModuleLoader: true, outputFileName: "run_view.html" })],
  build: {
    outDir: process.env.UI_OUT_DIR || "dist",
    emptyOutDir: true,
    target: "es2022",
    minify: true,
    sourcemap: false,
    modulePreload: false,
    reportCompressedSize: false,
  },
});
