// What on the way to a file of an export stops its read: a link to nothing, a file where a folder is, a folder this
// user may not enter (Node's own errors name the file at the end of the path). Node only: the browser reads no folders.
import { lstatSync, readlinkSync, statSync } from "node:fs";
import path from "node:path";

/** The export (OUT) `file` lies in, up to two folders down (OUT/adapters/x/f), or undefined. */
export const exportAbove = (file) => [path.dirname(file), path.dirname(path.dirname(file)), path.dirname(path.dirname(path.dirname(file)))]
  .find((p) => lstatSync(path.join(p, "base", "edgepeft.json"), { throwIfNoEntry: false })?.isFile());  // OUT/adapters/x/f

/** The file a path goes through (its first ancestor that is there), or null. */
export function throughFile(file) {
  for (let p = path.dirname(file); p !== path.dirname(p); p = path.dirname(p)) {
    try {
      return statSync(p).isFile() ? p : null;
    } catch {}  // not there, or under the file: one up
  }
  return null;
}

/** What the link on the way from OUT to `file` (OUT's own included) that leads to nothing (a disk not mounted) or back
 * to itself is, with the fixes that work, in the words of Python's files.check_output_dir; else null. An adapter's
 * was "not an exported adapter (no adapter.json)", whose re-export failed (its folder could not replace the link). */
export function linkToNothing(file, out) {
  let at = out;
  for (const name of ["", ...path.relative(out, file).split(path.sep)]) {
    at = path.join(at, name);
    let link = false;
    try {
      link = lstatSync(at).isSymbolicLink();
      if (link) statSync(at);  // a link to what is there: one down
    } catch (e) {
      if (!link || !["ENOENT", "ENOTDIR", "ELOOP"].includes(e.code)) return null;  // not there: nothing below it either
      return `${at}: is a link to ${readlinkSync(at)}, which ${e.code === "ELOOP" ? "leads back to itself (a loop of links); " +
        `remove the link, or make it lead to a ${at === file ? "file" : "folder"}` : "does not exist; create or mount it, or remove the link"}`;
    }
  }
  return null;
}

/** The outermost folder on the way to `file` this user may not enter (chmod 000 OUT/base), as the Python runtime's
 * access.check_readable names it, else null: a jsparity hunt found the file inside named, and making that file
 * readable changed nothing. A name is looked up in a folder only with leave to enter it (stat of "FOLDER/."). */
export function closedFolder(file) {
  const folders = [];
  for (let p = path.dirname(file); !folders.includes(p); p = path.dirname(p)) folders.unshift(p);
  for (const folder of folders) {
    try {
      statSync(folder + path.sep + ".");
    } catch (e) {
      return ["EACCES", "EPERM"].includes(e.code) ? folder : null;
    }
  }
  return null;
}
