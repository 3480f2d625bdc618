// Node.js: open an export folder with onnxruntime-node (or onnxruntime-web's wasm build, also in Node).
import { createHash } from "node:crypto";
import { lstatSync, readFileSync, readdirSync, readlinkSync, realpathSync, statSync } from "node:fs";
import { open, readFile, stat } from "node:fs/promises";
import { homedir, hostname } from "node:os";
import path from "node:path";

import { Tokenizer } from "@huggingface/tokenizers";

import { closedFolder, exportAbove, linkToNothing, throughFile } from "./paths.js";
import { JSON_MOST, REEXPORT_BASE, described, jsonMost, pastMost } from "./checks.js";
import { exportedAs, quote, reexport } from "./fixes.js";
import { EdgePeftError, Runtime } from "./runtime.js";
import { createSession } from "./sessions.js";
import { tokenizerOf } from "./tokenizer.js";

const sizeOf = (file) => stat(file).then((s) => s.size, () => 0);  // 0 where missing: the read then names it

/** A pipe or a device (a link to /dev/zero) read as a file blocks for ever or grows without bound: taken as missing,
 * as the Python runtime's access.present takes it. */
async function regular(file) {
  const s = await stat(file).catch(() => null);
  if (s && !s.isFile() && !s.isDirectory()) throw Object.assign(new Error("not a regular file"), { code: "ENOENT" });
}

async function read(file, encoding, out = null) {
  try {
    await regular(file);
    return await readFile(file, encoding);
  } catch (e) {
    throw named(e, file, out);
  }
}

/** A file system error as an EdgePeftError naming the file: a missing one is marked so (the runtime says what it
 * means for an export), one another user owns gets the fix that works (a re-export would not). */
function named(e, file, out = null) {
  const link = out && ["ENOENT", "ENOTDIR", "ELOOP"].includes(e.code) && linkToNothing(file, out);
  if (link) return new EdgePeftError(link);
  if (e.code === "ENOTDIR") {  // a file of the export given as OUT, or a file inside OUT where it has a folder
    const blocking = throughFile(file), of = blocking && exportAbove(blocking);  // Python's words for a file as OUT
    return new EdgePeftError(out && blocking?.startsWith(out + path.sep)
      ? `${blocking}: a file where the export has a folder; remove it and export again` : of
        ? `${blocking}: is a file of the export ${of}; give ${of} itself`
        : `${blocking ?? file}: is a file, not an export; give openFolder the export's folder (OUT)`);
  }
  if (e.code === "EACCES" || e.code === "EPERM") {
    const uid = process.geteuid?.();  // file access follows the effective id, as Python's os.geteuid (none on Windows)
    return new EdgePeftError(`${closedFolder(file) ?? file}: permission denied for this user${uid === undefined ? "" : ` (uid ${uid})`}; ` +
      "make it readable (chmod, chown), or run as a user who may read it");
  }
  if (e.code === "EISDIR") {
    return new EdgePeftError(`${file}: a folder where the export has a file; remove it and export again`);
  }
  if (e.code !== "ENOENT") return new EdgePeftError(`${file}: cannot read it (${e.code ?? e.message}); check the disk, or export again`);
  const why = out && missingInExport(file, out);
  if (why) return new EdgePeftError(why);  // not marked missing: the runtime's "export it there first" would fail
  let beside = [];  // the base's manifest gone beside other files: "export there first" was refused (files it did not write)
  try { beside = out && path.relative(out, file) === path.join("base", "edgepeft.json") ? readdirSync(path.dirname(file)) : []; } catch {}
  const error = new EdgePeftError(beside.length ? `${file}: missing, beside other files (an export's base whose manifest ` +
    `was removed, or not an export); ${REEXPORT_BASE}` : `${file}: no such file; export there first (edgepeft export ` +
    "--adapter DIR --out OUT) or give the export's folder");
  error.missing = true;  // loadTokenizer reads on without it
  return error;
}

/** Why a file of the export OUT is missing where the Python runtime tells (runtimes/access.py, manifest.py), else
 * null: its folder moved aside by an export that was stopped (.old-NAME-p<pid>h<host>-..., that process gone), or an
 * adapter's folder without its manifest ("export it there first" was refused: the folder is there). */
function missingInExport(file, out) {
  const parts = path.relative(out, file).split(path.sep);
  if (parts.join("/") === "base/edgepeft.json") {
    const why = notAnExport(out);
    if (why) return why;
  }
  for (let i = 1; i < parts.length; i++) {  // the first folder on the way that is not there
    const parent = path.join(out, ...parts.slice(0, i - 1)), name = parts[i - 1];
    let names;
    try {
      names = readdirSync(parent);
    } catch {
      return null;
    }
    if (!names.includes(name)) {
      const aside = names.find((n) => n.startsWith(`.old-${name}-p`) && stopped(n.slice(name.length + 7)));
      const target = path.join(parent, name), other = i === 1 && name === "base" &&  // access.py aside_elsewhere
        names.find((n) => n.startsWith(`.old-${name}-p`) && elsewhere(n.slice(name.length + 7)));
      return aside ? `${target}: moved aside to ${path.join(parent, aside)} by an export into ${out} ` +
        "that was stopped; run that export again (it puts the folder back first)" : other ? `${target}: missing; ` +
        `${path.join(parent, other)} holds it, moved aside by a run into ${out} on another machine, in another ` +
        `container or before a restart; once that run is over, put it back: \`mv ${quote(path.join(parent, other))} ` +
        `${quote(target)}\`` : null;
    }
  }
  if (parts.length === 3 && parts[0] === "adapters" && parts[2] === "adapter.json") {
    const folder = path.dirname(file);
    if (lstatSync(path.join(folder, "adapter_config.json"), { throwIfNoEntry: false })?.isFile()) {  // as Python says
      return `${folder}: is an adapter folder in HF PEFT format, not an exported one; move it out of ` +
        `${path.dirname(folder)} (mv ${quote(folder)} DIR), then export it into this OUT with \`edgepeft export ` +
        `--adapter DIR --out ${quote(out)}\``;  // as its folder lies here, export refused it
    }
    return `${folder}: not an exported adapter (no adapter.json); remove it if it is a stray folder, or ` +
      reexport(out, parts[1], folder);
  }
  return null;
}

/** What the folder `out`, which holds no export, is where the Python runtime tells it (runtimes/manifest.py
 * not_an_export): an adapter's, a part of an export, a model's; else null ("export there first" fits). */
function notAnExport(out) {
  const has = (...rel) => {
    try {
      return statSync(path.join(...rel)).isFile();
    } catch {
      return false;
    }
  };
  const up = path.dirname(out), part = path.basename(out), fresh = freshOut(out);
  const unexported = unexportable(out, has);  // "export it first" would be refused
  if (unexported) return unexported;
  const own = has(out, "adapter_config.json");
  let named = [];  // HF PEFT's save_pretrained(selected_adapters=...): its adapters in folders of their names
  try {
    named = own ? [] : readdirSync(out).filter((d) => !d.startsWith(".") && has(out, d, "adapter_config.json")).sort();
  } catch {}
  if (own || named.length) {  // commands.py exported_name: the folder's name, else --name
    const adapter = named.length ? path.join(out, named[0]) : out;
    const folder = path.basename(path.resolve(adapter)), as = exportedAs(folder);
    let name = as;
    for (let k = 2; as !== folder && as !== "NAME" && lstatSync(path.join(fresh, "adapters", name), { throwIfNoEntry: false }); k++) {
      name = `${as.slice(0, 100 - String(k).length - 1)}_${k}`;
    }
    const how = `\`edgepeft export --adapter ${quote(adapter)} --out ${quote(fresh)}${as === folder ? "" : ` --name ${quote(name)}`}\``;
    return `${out}: ${named.length ? `holds HF PEFT adapters saved under their names (${named.join(", ")}), not an export; ` +
      `export them first, e.g. ${how}` : `is an adapter folder (HF PEFT format), not an export; export it first with ${how}`}` +
      `, then open ${fresh} and pick adapter '${name}'`;
  }
  if (has(out, "adapter.json")) return `${out}: is one adapter of the export ${path.dirname(up)}; open ${path.dirname(up)} and pick adapter '${part}'`;
  if (has(out, "edgepeft.json") || ["base", "adapters"].includes(part) && has(up, "base", "edgepeft.json")) {
    return `${out}: is the ${part} folder of the export ${up}; open ${up} itself`;
  }
  return has(out, "config.json") ? `${out}: is a model folder, not an export; export an adapter trained on it with ` +
    `\`edgepeft export --adapter DIR --out ${quote(fresh)}\`, then use ${fresh}` : null;
}

/** The refusal an export of `out` would end in, where it is a model folder (or an adapter folder recording one here)
 * of a type edgepeft does not export, as the Python runtime's commands.unexportable; else null. */
function unexportable(out, has) {
  try {
    let config = path.join(out, "config.json");
    if (!has(config)) {  // an adapter folder: its recorded base, where that is a folder here
      config = path.join(JSON.parse(readFileSync(path.join(out, "adapter_config.json"), "utf8")).base_model_name_or_path, "config.json");
    }
    const type = JSON.parse(readFileSync(config, "utf8")).model_type;
    if (typeof type !== "string" || EXPORTED_TYPES.includes(type)) return null;
    return `${out}: is not an export, and ${config}'s model type '${type}' is one edgepeft does not export; it exports ` +
      `${EXPORTED_TYPES.join(", ")} models: train on one of those`;
  } catch {
    return null;  // no such file, not JSON, a hub id: not known
  }
}
const EXPORTED_TYPES = ["bert", "gpt2", "llama", "qwen2"];  // Python's runtimes/base_checks ENCODERS | DECODERS

/** A folder beside `out` for a suggested --out, as Python's commands.fresh_out: absolute (not ".-onnx"), its name
 * within a file name's 255 bytes (a character cut in two left out). */
function freshOut(out) {
  const absolute = path.resolve(out), name = Buffer.from(path.basename(absolute)).subarray(0, 250);
  return `${path.join(path.dirname(absolute), new TextDecoder().decode(name).replace(/\uFFFD$/, ""))}-onnx`;
}

/** Whether "<pid>h<host>-..." names a process of another machine, container or boot: none this one can tell stopped. */
function elsewhere(owner) {
  const host = /^\d+h([0-9a-f]{8})-[^-]+$/.exec(owner)?.[1];
  return host !== undefined && host !== thisHost();
}

/** "running" or "stopped" where "<pid>h<host>-..." names a process of this machine (a running one's folder is an
 * export's at work), as runtimes/access.py tells it; null for another machine's or container's (a shared drive). */
function processState(owner) {
  const [, digits, host] = /^(\d+)h([0-9a-f]{8})-[^-]+$/.exec(owner) ?? [];
  const pid = Number(digits);
  if (!Number.isSafeInteger(pid) || host !== thisHost() || process.platform === "win32") return null;
  try {
    process.kill(pid, 0);
    return "running";
  } catch (e) {
    return { ESRCH: "stopped", EPERM: "running" }[e.code] ?? null;  // EPERM: another user's, running
  }
}

const stopped = (owner) => processState(owner) === "stopped";

/** Whether an export of this machine that still runs is moving OUT's base aside: it is committing, and renames its
 * adapters' manifests for the new base (.adapter.json.new) in next (as runtimes/access.py committing). */
function committing(out) {
  try {
    return readdirSync(out).some((n) => n.startsWith(".old-base-p") && processState(n.slice(11)) === "running");
  } catch {
    return false;  // a folder it cannot list is no export's
  }
}

let host;

/** This machine and PID namespace as Python's this_host() hashes them: the host name, the boot, the namespace. */
function thisHost() {
  if (host === undefined) {
    const parts = [hostname()];
    for (const probe of [() => readFileSync("/proc/sys/kernel/random/boot_id", "utf8").trim(),
      () => String(statSync("/proc/self/ns/pid", { bigint: true }).ino)]) {
      try {
        parts.push(probe());
      } catch {}  // not Linux
    }
    host = createHash("sha1").update(parts.join("/")).digest("hex").slice(0, 8);
  }
  return host;
}

/** OUT made absolute where the system finds it, as the Python runtime's access.located: path.resolve (and Node's own
 * realpath) drop "LINK/.." by its text, where the system goes up from the link's target (another folder). */
function located(out) {
  const absolute = path.resolve(out);
  if (!out.replaceAll("\\", "/").split("/").includes("..")) return absolute;
  const real = realpath(out);
  return realpath(absolute) === real ? absolute : real;
}

/** `file` made absolute with its links resolved, as Python's os.path.realpath (not strict): name by name, each link
 * where it is there (a link to nothing too); a name that is not there (or a loop of links) kept as written, and a ".."
 * after it drops it. Node's realpath throws where the whole path is not there (path.resolve's text was taken:
 * "LINK/../OUT" with no OUT beside the link's target opened the OUT beside the link). */
function realpath(file, depth = 0) {
  const root = path.isAbsolute(file) ? path.parse(file).root : "";
  let real = root || process.cwd();  // the system's working folder: its links resolved
  for (const name of file.slice(root.length).split(path.sep === "/" ? "/" : /[\\/]/)) {
    if (name === "..") real = path.dirname(real);
    else if (name && name !== ".") {
      const next = path.join(real, name);
      try {
        real = realpathSync.native(next);  // links resolved in order
      } catch {
        let target = null;  // a link to nothing (a disk not mounted) is followed, as Python's realpath follows it
        try { target = depth < 40 ? readlinkSync(next) : null; } catch {}
        real = target === null ? next : realpath(path.resolve(real, target), depth + 1);  // else as written: not there,
      }  // a loop past 40 links, or a file's "child"
    }
  }
  return real;
}

/** Files of the export folder OUT, read from disk; a relative OUT is resolved once (the app may change directory). */
export function folderLoader(out) {
  if (typeof out !== "string" || !out || out.includes("\0")) {  // a NUL: Node's own ERR_INVALID_ARG_VALUE
    throw new EdgePeftError(`openFolder and loadTokenizer take an export's folder (a path), got ${described(out)}`);
  }
  if ((out === "~" || out.startsWith("~/")) && !lstatSync("~", { throwIfNoEntry: false })) {  // Node expands none
    throw new EdgePeftError(`${out}: '~' is not expanded here; give it the full path, ${path.join(homedir(), out.slice(1))}`);
  }
  out = located(out);
  return {
    folder: true,  // a folder of this disk: messages name it in the export commands they give
    where: (rel) => path.join(out, rel),
    json: async (rel) => {  // a manifest past 16 MiB is refused unread, as in Python (parsed, JSON takes ~20x its bytes)
      const size = await sizeOf(path.join(out, rel));
      if (size > jsonMost(rel)) throw new Error(`${size} bytes, more than any edgepeft reads (${JSON_MOST})`);
      return JSON.parse(await read(path.join(out, rel), "utf8", out));
    },
    bytes: async (rel, most) => {  // ``most``: more is refused by its size, unread (a sparse file, or a link to a large one)
      const size = most === undefined ? 0 : await sizeOf(path.join(out, rel));
      if (size > most) throw pastMost(path.join(out, rel), most);
      return new Uint8Array(await read(path.join(out, rel), undefined, out));
    },
    // a file's size in bytes (undefined: missing; checkSizes names it)
    size: async (rel) => stat(path.join(out, rel)).then((s) => {
      if (s.isDirectory()) throw named({ code: "EISDIR" }, path.join(out, rel));
      return s.size;
    }, (e) => {
      if (e.code === "ENOENT") return undefined;
      throw named(e, path.join(out, rel), out);
    }),
    // onnxruntime-node reads a graph's external weights (model.onnx.data) beside the file itself;
    // onnxruntime-web takes them as bytes
    session: async (ort, rel, options, external) => {
      const file = path.join(out, rel);
      if (ort.env?.versions?.node === undefined && external) {
        const data = await read(path.join(path.dirname(file), "model.onnx.data"));
        return createSession(ort, await read(file), { ...options, externalData: [{ path: "model.onnx.data", data }] });
      }
      for (const readable of external ? [file, path.join(path.dirname(file), "model.onnx.data")] : [file]) {
        await (await regular(readable).then(() => open(readable)).catch((e) => { throw named(e, readable); })).close();  // ONNX Runtime: "error 13"
      }
      return createSession(ort, file, options).catch((e) => {
        const far = external && outOfReach(file);  // intact files, another layout
        throw far ? new EdgePeftError(far) : e;
      });
    },
  };
}

/** What to say where `graph`'s weights file is a link leading out of the graph's folder (weights shared by two copies,
 * a DVC or git-annex checkout): ONNX Runtime 1.24+ reads them only within its folder or its real file's folder (a
 * Hugging Face cache's blobs/), and the copy was called damaged. As the Python runtime's access.weights_out_of_reach. */
function outOfReach(graph) {
  const data = path.join(path.dirname(graph), "model.onnx.data");
  if (!lstatSync(data, { throwIfNoEntry: false })?.isSymbolicLink()) return null;
  const real = realpath(data);
  const within = (folder) => !path.relative(folder, real).startsWith("..") && !path.isAbsolute(path.relative(folder, real));
  if (within(realpath(path.dirname(graph))) || within(path.dirname(realpath(graph)))) return null;
  return `${data}: is a link to ${real}, outside the graph's folder, and ONNX Runtime 1.24 and later read no weights ` +
    `there; put the file in its place: rm ${quote(data)} && cp ${quote(real)} ${quote(data)}`;
}

/** A Runtime over a folder: an adapter is read again where an export renamed a new folder in while it was read (its
 * manifest paired with the new graph: "checksum does not match; re-export it"), as Python's adapter_source. */
class FolderRuntime extends Runtime {
  async loadAdapter(name, ...more) {
    return unchangedWhile(this.loader.where(`adapters/${name}`), () => super.loadAdapter(name, ...more),
      () => this.unloadAdapter(name), "load");
  }

  /** A manifest; an adapter's, while a running export commits (committing) and has renamed its new base in, not yet
   * this adapter's manifest for it: that one, which it renames in next (it was "made for another base; an export
   * into OUT was stopped ... run that export again", of an export running), as Python's adapter_source. */
  async json(rel, missing) {
    const manifest = await super.json(rel, missing), base = this.manifest?.fingerprint;
    const name = /^adapters\/([^/]+)\/adapter\.json$/.exec(rel)?.[1];
    if (!name || !base || manifest?.base_fingerprint === base || !committing(this.loader.where("."))) return manifest;
    const waiting = await super.json(`adapters/${name}/.adapter.json.new`, "missing").catch(() => null);
    return waiting?.base_fingerprint === base ? waiting : manifest;
  }
}

/** read()'s result, where `folder` stayed the same folder from before it began until it ended; read again (what it
 * gave released) where an export renamed a new one in meanwhile, as Python's unchanged_while. */
async function unchangedWhile(folder, read, release, again) {
  for (let tries = 1; tries <= 3; tries++) {
    const seen = identity(folder);
    let result;
    try {
      result = await read();
    } catch (e) {
      if (identity(folder) === seen) throw e;
      continue;
    }
    if (identity(folder) === seen) return result;
    await release(result);
  }
  throw new EdgePeftError(`${folder}: replaced 3 times while it was read (exports into it, one after another); ${again} ` +
    "it again once they are done");
}

/** A Runtime over the export folder OUT: Runtime.open with the folder's files. */
export async function openFolder(ort, out, options = {}) {
  const loader = folderLoader(out);
  // an export renaming a new base in while it was read paired its manifest with the other's graph (or weights from
  // both): read again where the folder changed meanwhile
  return unchangedWhile(loader.where("base"), () => FolderRuntime.open(ort, loader, options),
    (rt) => rt.release().catch(() => {}), "open");
}

/** The folder's device and inode: another once an export renames a new one in (undefined: gone). */
function identity(folder) {
  try {
    const found = statSync(folder, { bigint: true });
    return `${found.dev}:${found.ino}`;
  } catch {
    return undefined;
  }
}

/** The tokenizer exported with the base (tokenizer.json, tokenizer_config.json). */
export async function loadTokenizer(out) {
  return tokenizerOf(Tokenizer, folderLoader(out));
}
