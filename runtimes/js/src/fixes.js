// The fixes messages give for an export's adapter folders, in the Python runtime's words (runtimes/commands.py
// folder_fix, export_name_problem, exported_as, pairs_fix): export commands that work when pasted into a shell.

import { EdgePeftError } from "./checks.js";

const NAME_LENGTH = 100;  // as commands.py: OUT/adapters/<name> and its staging folder within a file name's 255 bytes

/** `s` as a POSIX shell reads it back, as Python's shlex.quote: a path with a space was two arguments. */
export const quote = (s) => s === "" ? "''" : /^[\w@%+=:,./-]+$/.test(s) ? s : `'${s.replace(/'/g, `'"'"'`)}'`;

const DEVICE = /^(con|prn|aux|nul|com[0-9]|lpt[0-9])$/i;  // Windows' devices: no folder takes their names there
const refused = (name) => !/^[A-Za-z0-9][A-Za-z0-9_-]*$/.test(name) || name.length > NAME_LENGTH ||
  name.toLowerCase() === "none" || DEVICE.test(name);

/** Whether loadAdapter takes `name`, as the Python runtime's commands.name_problem: a folder's name in OUT/adapters,
 * not a path ('/', '\\'), no spaces at its ends nor a control character (a typo: " lora" was told to export --name
 * lora, which OUT holds), no '.' first (a hidden folder, as an export's .staging-NAME-...: Python's Runtime leaves
 * those out). */
export const adapterName = (name) => typeof name === "string" && name.trim() === name && !/^$|^\.|[/\\\0-\x1f\x7f-\x9f\ufeff]/.test(name) &&
  name.toLowerCase() !== "none";  // the base model at the command line: Python's Runtime(OUT) refuses such a folder
export const NAME_RULE = "an adapter's name must be a non-empty string, a folder's name in OUT/adapters (no path) " +
  "that is not hidden (no '.' first) nor none (the base model at the command line), with no control character and " +
  "no spaces at its ends";

/** Per task, the record a call reads that an earlier edgepeft's manifest may lack, and what follows from it (Python's
 * access.OLDER_RECORDS; this runtime has no embed). */
const OLDER_RECORDS = {
  "causal-lm": ["generation", "the model's generation_config.json, which generate follows"],
  "seq-cls": ["problem_type", "the model config's, by which scores are softmax, sigmoid or none"],
};

/** Refuses where `manifest` (of the base folder `where`) predates the record a `task` call reads (OLDER_RECORDS: a
 * classifier's scores, generate's settings): read as a default, a call answered otherwise than the model (Python's
 * older_export). */
export function olderExport(where, manifest, task) {
  const [field, what] = OLDER_RECORDS[task];
  if (!(field in manifest)) {
    throw new EdgePeftError(`${where}: was written by an earlier edgepeft, whose manifest records no ${field} (${what}); ` +
      "export every adapter into a fresh --out folder");
  }
}

/** `name` as export takes it for OUT/adapters/<name>: itself, else a name like it, else NAME (a load takes more). */
export function exportedAs(name) {
  if (!refused(name)) return name;
  let mended = name.replace(/[^A-Za-z0-9_-]/g, "_").replace(/^[_-]+/, "").slice(0, NAME_LENGTH);
  if (DEVICE.test(mended)) mended += "_adapter";  // as Python's export_name_suggestion: aux, aux_adapter
  return mended && !refused(mended) ? mended : "NAME";
}

/** The export that brings adapter `name` (its folder `folder`) back into OUT (`out`: the folder, or null where the
 * loader reads no folder: a URL is no --out): with --overwrite, or for a name export refuses ("my.lora"), after
 * removing the folder, under a name it takes. */
export function reexport(out, name, folder, where = "") {
  const as = exportedAs(name);
  const command = `\`edgepeft export --adapter DIR --out ${out === null ? "OUT" : quote(out)} --name ${quote(as)}` +
    `${as === name ? " --overwrite" : ""}\``;
  return `${as === name ? "" : `remove ${folder}, then${where ? ", " : " "}`}${where}re-export its adapter into this OUT: ${command}`;
}

/** Where the adapter (its manifest) was made for another task than OUT's base (`base`), which no export into this OUT
 * takes: what serves it; else "" (commands.py other_task). */
export const otherTask = (adapter, base) => adapter.task == null || adapter.task === base.task ? "" :
  `it was made for a ${adapter.task} export (of ${adapter.base_source}), not this ${base.task} one: load it on the ` +
  "export it was made for";

/** What mends the adapter folder `name` of the Runtime `rt`'s OUT, whose `manifest` names another base: off a --merge
 * export; where an export stopped before it re-pointed the folder (its new manifest waiting beside it), that export
 * run again; else removed or re-exported ("re-export it into this OUT", which export refused without --overwrite),
 * or, made for another export of this base's model, that export copied again (commands.py copied_base_fix: a device
 * with the runtime alone cannot export; a newer export brought a new base and re-pointed the other adapters). */
export async function folderFix(rt, name, merged, manifest) {
  const { loader } = rt;
  if (merged) return `remove it from ${loader.where("adapters")}, or export it into another --out`;
  const folder = loader.where(`adapters/${name}`), out = loader.folder ? loader.where("") : null;
  const other = otherTask(manifest, rt.manifest), made = manifest.base_source, source = rt.manifest.source;
  if (other) return `remove ${folder}: ${other}`;
  const where = made && source && made !== source ? `where ${made} is the model of ${source}, ` : "";  // made_elsewhere
  const then = where ? ", " : " ", again = reexport(out, name, folder, where), copied = made && made === source
    ? "; or, where this OUT is a copy, copy the export it came from again: its base folder and every adapter" : "";
  if (exportedAs(name) !== name) return again + copied;
  // its manifest for this base waiting beside it (commands.py REPOINTED): a folder's file there; over HTTP, a file that
  // reads as that manifest (a server answering every path with 200, a page's fallback, had an export stopped)
  const rel = `adapters/${name}/.adapter.json.new`, fingerprint = rt.manifest.fingerprint;
  const waiting = loader.folder ? await loader.size?.(rel).catch(() => undefined) !== undefined
    : await loader.json(rel).then((m) => m?.format === "edgepeft-adapter" && m.base_fingerprint === fingerprint, () => false);
  return !waiting ? `remove ${folder}, or${then}${again}${copied}` : `an export into ${out ?? "OUT"} was ` +
    `stopped before it re-pointed it; run that export again (where OUT can be locked, not on Windows, it finishes that ` +
    `first), or${then}${again}`;
}

/** What loadAdapter says of a name OUT/adapters lacks: a --merge export takes no adapters (Python's export refuses
 * them there), and serves its own without loading it. */
export const missingAdapter = (name, merged) => name === merged ? `${name} is merged into this export's base: calls ` +
  "serve it without loading it (adapter null, or its name)" : merged ? `no adapter ${name} in this --merge export (of ` +
  `${merged}), which takes no adapters; export it into another --out folder` : `no adapter ${name} in this export; ` +
  `export it there first (edgepeft export --adapter DIR --out OUT --name ${quote(exportedAs(name))})` +
  (exportedAs(name) === name ? "" : `, then load ${JSON.stringify(exportedAs(name))}, the name it gets there`);

/** What a call naming an adapter that is not loaded is told: the names quoted, as Python's repr ("lora " and "lora"). */
export const notLoaded = (adapter, loaded, merged) => `adapter ${JSON.stringify(adapter)} is not loaded; loaded: ` +
  `${loaded.map((n) => JSON.stringify(n)).join(", ") || "none"}${merged ? `; ${JSON.stringify(merged)} is merged into ` +
  "the base" : ""} (use adapter null for the base model)`;

/** What serves text pairs from a BERT classifier an earlier edgepeft exported (commands.py pairs_fix). */
export const pairsFix = (manifest) => (manifest.merged_adapter ? "export it again with --merge --overwrite (its base " +
  "is then written with token types)" : !(manifest.format_version >= 3) || !("generation" in manifest) ? "export every " +
  "adapter into a fresh --out folder (an earlier edgepeft's export takes no new adapter)" : "export an adapter into " +
  "it again (its base is then written with token types), or every adapter into a fresh --out folder");  // Python's
