// How the runtime runs its ONNX Runtime sessions (the Python runtime's runtimes/sessions.py, in JavaScript's terms).

/**
 * The base session's runs, one at a time: onnxruntime-web's wasm runs of one session share its stack, and two calls
 * awaited at once (Promise.all, a button clicked twice) hung the process or the page. onnxruntime-node's runs are
 * queued in its thread pool anyway, so waiting a turn costs it nothing.
 */
export class TakingTurns {
  constructor(session) {
    this.session = session;
    this.turn = Promise.resolve();
  }

  get inputNames() {
    return this.session.inputNames;
  }

  run(feeds) {
    const run = this.turn.then(() => this.session.run(feeds));
    this.turn = run.catch(() => {});  // a failed run is its caller's; the next one runs
    return run;
  }

  /** Release the session once the runs already queued are done (wasm sessions are freed by release only). */
  release() {
    const released = this.turn.then(() => this.session.release?.());
    this.turn = released.catch(() => {});
    return released;
  }
}

/** A graph with no inputs, run once; its session is released (else it leaks). */
export async function runOnce(session) {
  try {
    return await session.run({});
  } finally {
    await session.release?.().catch(() => {});  // a failed release must not hide what run did
  }
}
