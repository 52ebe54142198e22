"""Latency tables and the latency cost model: what a shrunk model costs on a real runtime.

MACs are a proxy that fails where speed matters most: depthwise and early
high-resolution layers are memory bound (few MACs, much time), and widths
that are not a multiple of the kernel's vector width waste lanes. A
*latency table* holds, for every kernel layer of a model (Conv, Dense,
Depthwise, Separable, transposed convs and registered layers) and a grid of
its input and output widths, the latency that layer alone takes on a target
runtime, measured on this machine:

- each grid point is the layer rebuilt at those widths by its own
  `strip_and_shrink` handler, with the layer's own input shape and
  activation; each layer is converted once and its other widths are copies
  of the converted graph with other shapes (`tflite_widths`; a layer whose
  widths cannot be told apart from its other dimensions is converted at
  every width); the points are timed in multi-signature `.tflite` files,
  signature by signature, interleaved (A, B, C, A, B, C, ...), the fastest of
  `runs` rounds (other work on the machine only ever adds time);
- output widths are measured at multiples of the runtime's *quantum* `q`
  (the width step at which XNNPACK's kernels change speed, measured once per
  machine: 16 on AVX-512 CPUs) and between them, because a width of
  `k*q + 1` costs about as much as `(k+1)*q` (a pointwise conv) or more (a
  depthwise conv): the table is a staircase, not a line;
- every point is cached on disk, keyed by the layer's config, input shape,
  widths, runtime, threads and machine (`cache_dir`, default
  `$TF_PSP_CACHE` or `~/.cache/tf_psp`), so a table is measured once.

The cost model predicts a shrunk model's latency as

    latency(shrunk) = fixed + scale * sum over kernel layers of table(layer, c_in, c_out)

A layer alone is not a layer in a model (the interpreter's per-call overhead,
the ops around it), so `fixed` and `scale` are a least-squares line through
whole models measured interleaved with the dense one (`CALIBRATION`: two
random selections, at 0.6 of the MACs with any widths and at 0.3 on the
quantum).
It is validated against measured latencies of random shrunk variants by
`benchmarks/latency_model.py`. Use it
for ratios (`predict(shrunk) / predict(dense)`): the machine's speed drifts
by 10-20 % between runs here, and a ratio measured in one run does not.

Runtimes (`tf_psp.latency_targets`): `'tflite'` (LiteRT with its default
XNNPACK delegate, `threads` CPU threads), float32 or `quantization='int8'`
(full-integer); `'onnxruntime'` (CPU execution provider, float32). JAX on a
GPU is not tabulated yet.
"""

import dataclasses
import hashlib
import json
import math
import os
import platform
import sys
import tempfile
import time
import warnings

import numpy as np

from tf_psp import atomic
from tf_psp import graph as psp_graph
from tf_psp.functional import check_model
from tf_psp.latency_targets import target
from tf_psp.macs import mac_rule

TABLE_VERSION = 2
QUANTA = (32, 16, 8, 4, 2)  # widths tried as the runtime's quantum, largest first
_BATCH_SIGNATURES = 60  # grid points converted into one .tflite file
_REFERENCE = "__reference__"  # cache key of the drift reference's latency


def cache_directory(cache_dir=None):
    """The directory latency points are cached in."""
    if cache_dir is not None:
        return os.fspath(cache_dir)
    root = os.environ.get("TF_PSP_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "tf_psp")
    return os.path.join(root, "latency")


def machine_id():
    """A short description of this CPU: the cache key of measured latencies."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} x{os.cpu_count()}"


# --- the kernel layers of a model ---------------------------------------------------


@dataclasses.dataclass
class KernelCall:
    """One call of a kernel layer: what a latency table has a grid for.

    Attributes:
        name: the layer's name (a shrunk model keeps it).
        input_shape: the call's input shape at full width (batch 1).
        cin, cout: its input and output channels at full width.
        tied: the output width follows the input (depthwise: `cout = m * cin`).
        node: the `ChannelGraph` node (not serialized).
    """

    name: str
    input_shape: tuple
    cin: int
    cout: int
    tied: bool
    node: object = None


def kernel_calls(plain_model, graph=None):
    """The `KernelCall`s of a plain model, in graph order (shared layers: first call)."""
    g = graph if graph is not None else psp_graph.ChannelGraph(plain_model)
    calls, seen = [], set()
    for node in g.nodes:
        if not g.is_live(node) or node.name in seen:
            continue
        if mac_rule(node.layer) is None or len(node.inputs) != 1 or len(node.outputs) != 1:
            continue
        tied = isinstance(node.handler, psp_graph.DepthwiseHandler)
        if node.handler.kind != "producer" and not tied:
            continue
        shape = tuple(node.inputs[0].tensor.shape)
        if any(d is None for d in shape[1:]) or not shape:
            continue
        seen.add(node.name)
        calls.append(KernelCall(node.name, (1,) + tuple(int(d) for d in shape[1:]),
                                int(node.inputs[0].channels), int(node.outputs[0].channels),
                                tied, node))
    return calls


def _layer_at(call, cin, cout):
    """The call's layer rebuilt at (cin, cout) by its own shrink handler."""
    node = call.node
    keep_in = [np.arange(cin)]
    keep_out = [np.arange(cout)]
    consts = [np.full(call.cin, np.nan)]
    needed = [np.ones(call.cin, bool)]
    layer, weights = node.handler.rebuild(node, keep_in, keep_out, consts, needed)
    return layer, weights


def _point_key(call, cin, cout, runtime, threads, machine):
    """`runtime`: the target's label (`'tflite'`, `'tflite-int8'`, `'onnxruntime'`)."""
    config = dict(call.node.layer.get_config())
    config.pop("name", None)
    text = json.dumps([type(call.node.layer).__name__, config, call.input_shape[:-1],
                       cin, cout, runtime, threads, machine, TABLE_VERSION],
                      sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()


# --- grids ------------------------------------------------------------------------


def _round_up(n, q):
    return int(math.ceil(n / q) * q)


def width_grid(full, quantum, points):
    """On-quantum widths (multiples of `quantum`, up to `full`) spread over [0.1, 1] * full.

    `full` itself is included when it is a multiple of the quantum; widths
    above the last multiple are read from the off-quantum table.
    """
    top = (full // quantum) * quantum
    if top == 0:
        return np.array([], int)
    grid = {top}
    for f in np.linspace(0.1, 1.0, points):
        grid.add(min(top, max(quantum, _round_up(f * full, quantum))))
    return np.array(sorted(grid), int)


def _off_width(p, quantum, full):
    """The off-quantum width measured for step `p` (a multiple of the quantum): p - 1,
    an odd width, the worst case of a kernel's remainder path."""
    if full < p:
        return full
    return p - 1 if quantum > 1 else p


@dataclasses.dataclass
class LayerLatency:
    """Measured latency of one kernel layer over a grid of widths (seconds).

    `on[i, j]`: input width `cins[i]`, output width `steps[j]` (a multiple of
    the quantum). `off[i, j]`: the output width just below the step
    (`steps[j] - 1`, standing for every width between two steps). For a tied (depthwise)
    layer the grids are 1 x n with the input width following the output.
    `fine`: a finer alignment that costs what the next step costs (ONNX
    Runtime's depthwise convs: any multiple of 4 on this CPU); 0: none.
    `off_cins`, `off_in_on`, `off_in_off`: where the input width's alignment
    matters too (ONNX Runtime runs a conv whose input width is not a multiple
    of the quantum on another kernel), the same tables at input widths one
    below a multiple of the quantum, read for such input widths; empty
    elsewhere.
    """

    name: str
    cin: int
    cout: int
    tied: bool
    quantum: int
    cins: list
    steps: list
    on: list
    off: list
    fine: int = 0
    off_cins: list = dataclasses.field(default_factory=list)
    off_in_on: list = dataclasses.field(default_factory=list)
    off_in_off: list = dataclasses.field(default_factory=list)

    def _aligned_out(self, cout):
        """The output width is on the quantum or on the fine alignment."""
        q = self.quantum
        return q == 1 or cout % q == 0 or bool(self.fine and cout % self.fine == 0)

    def _off_in(self, cin):
        """The input width is off the quantum where the input's alignment matters."""
        return bool(self.off_cins and not self.tied and cin % self.quantum
                    and cin > self.quantum)

    def off_quantum(self, cin, cout):
        """Whether (cin, cout) runs on the runtime's slower kernels: an output width off the
        quantum (and off the fine alignment), or an input width off it where the input's
        alignment matters."""
        if self.tied:
            cout = cin
        return not self._aligned_out(cout) or self._off_in(cin)

    def seconds(self, cin, cout):
        """Predicted latency at `cin` input and `cout` output channels."""
        if self.tied:
            cout = cin
        q = self.quantum
        step = _round_up(max(cout, 1), q)
        steps = np.asarray(self.steps, float)
        cins, on, off = self.cins, self.on, self.off
        if self._off_in(cin):
            cins, on, off = self.off_cins, self.off_in_on, self.off_in_off
        table = np.asarray(on if self._aligned_out(cout) and step <= self.cout else off, float)
        if self.tied or len(cins) == 1:
            row = table[0]
        else:
            cins = np.asarray(cins, float)
            row = np.array([np.interp(cin, cins, table[:, j]) for j in range(table.shape[1])])
        if step > steps[-1] and len(steps) > 1:  # a width the grid does not reach
            slope = (row[-1] - row[-2]) / (steps[-1] - steps[-2])
            return float(row[-1] + slope * (step - steps[-1]))
        return float(np.interp(step, steps, row))


@dataclasses.dataclass
class LatencyTable:
    """Latency tables of a model's kernel layers on one runtime, and the cost model.

    Build it with `latency_table(model, ...)`; `predict(shrunk_model)` gives
    the predicted latency of any `strip_and_shrink` result of the model.

    Attributes:
        model: the model's name.
        runtime, threads: where the latencies were measured.
        machine: `machine_id()` of the machine that measured them.
        quantization: the number format (None: float32; `'int8'`).
        quantum: the width step of the runtime's kernels (`round_to='auto'`).
        fine_quantum: a finer alignment that costs what the next step does
            (see `measure_fine_quantum`); 0 where the runtime has none.
        layers: layer name -> `LayerLatency`.
        dense_seconds: the measured latency of the whole model at full width.
        fixed_seconds, scale: the fitted cost model (see the module docstring).
        scale_off: where not None (ONNX Runtime), the scale of the layers that
            run off the quantum (`LayerLatency.off_quantum`), fitted apart: in a
            whole model they cost more than alone (their kernels and the
            layout changes around them).
        calibration: the whole models it was fitted on: `model` (which
            one), `measured` and `predicted` seconds.
        build_seconds: wall time of building the table.
    """

    model: str
    runtime: str
    threads: int
    machine: str
    quantum: int
    layers: dict
    dense_seconds: float
    fixed_seconds: float
    scale: float = 1.0
    calibration: list = dataclasses.field(default_factory=list)
    build_seconds: float = 0.0
    quantization: str | None = None
    fine_quantum: int = 0
    scale_off: float | None = None

    def describe(self):
        """`'tflite int8, 1 thread(s)'`: where the table was measured."""
        return target(self.runtime, self.threads, self.quantization).describe()

    def layer_seconds(self, name, cin, cout):
        """Predicted latency of layer `name` at (cin, cout); 0 for an untabled layer."""
        entry = self.layers.get(name)
        return entry.seconds(cin, cout) if entry is not None else 0.0

    def predict_widths(self, widths):
        """Predicted latency when every layer `name` in `widths` runs at `(cin, cout)`;
        a tabled layer missing from `widths` counts at full width."""
        if self.scale_off is None:
            return max(self.fixed_seconds + self.scale * self.table_sum(widths), 0.0)
        on, off = self.table_sums(widths)
        return max(self.fixed_seconds + self.scale * on + self.scale_off * off, 0.0)

    def table_sum(self, widths=None):
        """Sum of the layer tables at `widths` (default: full widths)."""
        return sum(self.table_sums(widths))

    def table_sums(self, widths=None):
        """`(on, off)`: the sums of the layer tables at `widths` of the layers on and off
        the quantum (`LayerLatency.off_quantum`)."""
        widths = widths or {}
        sums = [0.0, 0.0]
        for name, entry in self.layers.items():
            cin, cout = widths.get(name, (entry.cin, entry.cout))
            sums[entry.off_quantum(cin, cout)] += entry.seconds(cin, cout)
        return tuple(sums)

    def predict(self, model):
        """Predicted latency (seconds) of `model`: the table's model or a shrunk version.

        Raises:
            ValueError: `model` has a kernel layer the table does not know.
        """
        from tf_psp.shrink import strip

        calls = kernel_calls(strip(model))
        unknown = [c.name for c in calls if c.name not in self.layers]
        if unknown:
            raise ValueError(
                f"model '{model.name}' has kernel layers the latency table of "
                f"'{self.model}' does not hold: {unknown[:5]}; build a table for it.")
        return self.predict_widths({c.name: (c.cin, c.cout) for c in calls})

    def to_dict(self):
        out = dataclasses.asdict(self)
        out["version"] = TABLE_VERSION
        return out

    @classmethod
    def from_dict(cls, data):
        data = dict(data)
        version = data.pop("version", None)
        if version != TABLE_VERSION:
            raise ValueError(f"latency table version {version}, expected {TABLE_VERSION}.")
        data["layers"] = {k: LayerLatency(**v) for k, v in data["layers"].items()}
        return cls(**data)

    def save(self, path):
        """Writes the table as JSON (atomically)."""
        atomic.write_bytes(path, json.dumps(self.to_dict(), indent=1).encode())

    @classmethod
    def load(cls, path):
        """Reads a table written by `save`."""
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


# --- measuring ----------------------------------------------------------------------


class _Cache:
    """Measured points on disk: one JSON file per runtime, threads, machine and version."""

    def __init__(self, directory, runtime, threads, machine):
        digest = hashlib.sha1(f"{runtime}|{threads}|{machine}".encode()).hexdigest()[:12]
        self.path = os.path.join(directory,
                                 f"{runtime}-{threads}t-v{TABLE_VERSION}-{digest}.json")
        self.values = {}
        if os.path.exists(self.path):
            try:
                with open(self.path, encoding="utf-8") as f:
                    self.values = json.load(f)
            except (OSError, ValueError):
                self.values = {}

    def save(self):
        atomic.write_bytes(self.path, json.dumps(self.values).encode())


def _progress(total, enabled, unit="point"):
    if not enabled or total == 0:
        return None
    import keras

    bar = keras.utils.Progbar(total, unit_name=unit, stateful_metrics=())
    bar.update(0)  # shown at once, not after the first (slow) step
    return bar


def layer_models(points):
    """One-layer Keras models of each `(KernelCall, cin, cout)`: the layer rebuilt at those
    widths by its own shrink handler, on the call's input shape at `cin` (batch 1)."""
    import keras

    models = []
    for call, cin, cout in points:
        layer, weights = _layer_at(call, cin, cout)
        x = keras.Input(batch_shape=call.input_shape[:-1] + (cin,))
        models.append(keras.Model(x, layer(x)))
        if weights is not None:
            layer.set_weights(weights)
    return models


def _reference_call():
    """A fixed 1x1 convolution timed in every batch: the machine's drift between batches."""
    import keras

    x = keras.Input(batch_shape=(1, 28, 28, 64))
    model = keras.Model(x, keras.layers.Conv2D(64, 1, name="latency_reference")(x))
    (call,) = kernel_calls(model)
    return call


def _template(call):
    """`(c_in, c_out, markers)` to convert `call` at once and copy at other widths
    (`tflite_widths`), or None when its widths cannot serve as markers."""
    from tf_psp.tflite_widths import choose_markers

    layer = call.node.layer
    forbidden = {int(d) for d in call.input_shape[1:-1]}
    forbidden |= {int(d) for d in tuple(call.node.outputs[0].tensor.shape)[1:-1]
                  if d is not None}
    for attr in ("kernel_size", "strides", "dilation_rate"):
        value = getattr(layer, attr, None)
        if value is not None:
            forbidden |= {int(v) for v in np.atleast_1d(value)}
    if call.tied:
        m = call.cout // call.cin
        chosen = choose_markers(call.cin, call.cout, forbidden, (m,), tied=True)
        if chosen is None:
            return None
        return chosen + ({chosen[0]: (0, 1), chosen[1]: (0, m)},)
    d = int(getattr(layer, "depth_multiplier", 1) or 1)
    chosen = choose_markers(call.cin, call.cout, forbidden, (1, d))
    if chosen is None:
        return None
    markers = {chosen[0]: (0, 1), chosen[1]: (1, 1)}
    if d > 1:
        markers[d * chosen[0]] = (0, d)
    return chosen + (markers,)


def _templates(calls, bar, where, chunk=16):
    """A width patcher of target `where` holding the calls that have a template
    (converted `chunk` at a time, ids `id(call)` in `patcher.ids`)."""
    plans = [(call, _template(call)) for call in calls]
    plans = [(call, plan) for call, plan in plans if plan is not None]
    converted, templates = [], {}
    for start in range(0, len(plans), chunk):
        part = plans[start:start + chunk]
        models = layer_models([(call, c_in, c_out) for call, (c_in, c_out, _) in part])
        for k, (call, (c_in, c_out, markers)) in enumerate(part):
            shape = call.input_shape[:-1] + (c_in,)
            templates[id(call)] = (len(converted), k, markers, shape, c_out)
        try:
            converted.append(where.convert_layers(models))
        except Exception:  # noqa: BLE001 - these layers are converted one width at a time
            for call, _ in part:
                templates.pop(id(call))
            converted.append(None)
        if bar is not None:
            bar.add(len(part))
    return where.patcher([c for c in converted if c is not None],
                         _reindex(templates, converted))


def _reindex(templates, converted):
    """Template file indices with the failed (empty) conversions left out."""
    kept = {}
    for index, content in enumerate(converted):
        if content is not None:
            kept[index] = len(kept)
    return {tid: (kept[f], *rest) for tid, (f, *rest) in templates.items() if f in kept}


def _batches(items, size):
    return [items[k:k + size] for k in range(0, len(items), size)]


def measure_points(points, runtime="tflite", threads=1, runs=15, cache_dir=None,
                   progress=True, quantization=None):
    """Measured seconds of each `(KernelCall, cin, cout)` in `points` (cached on disk).

    Each layer is converted once (`tflite_widths`, `onnx_widths`: its other
    widths are copies of that graph with other shapes; a layer whose widths
    cannot be told from its other dimensions is converted at every width).
    Points are timed in batches (`latency_targets`), interleaved, minimum of `runs`
    rounds; every batch also times a fixed reference layer, and its points
    are scaled by (the reference's latency in the cache's first batch / in
    this batch), so batches measured apart (the machine's speed drifts) stay
    comparable. With one thread, warns when other programs held the core
    more than half of the time (`SHARE_WARNING`).
    """
    where = target(runtime, threads, quantization)
    machine = machine_id() + " | " + where.version()
    cache = _Cache(cache_directory(cache_dir), where.label, threads, machine)
    keys = [_point_key(c, i, o, where.label, threads, machine) for c, i, o in points]
    todo = {}
    for key, point in zip(keys, points):
        if key not in cache.values:
            todo.setdefault(key, point)
    if not todo:
        return [cache.values[k] for k in keys]
    items = list(todo.items())
    reference = _reference_call()
    calls = list({id(c): c for _, (c, _, _) in items}.values()) + [reference]
    bar = _progress(len(calls) + len(items), progress, unit="step")
    patcher = _templates(calls, bar, where)
    patchable = patcher.ids
    if bar is not None:
        bar.update(len(calls))  # layers without a template are converted with their points
    fast = [item for item in items if id(item[1][0]) in patchable]
    slow = [item for item in items if id(item[1][0]) not in patchable]
    shares = [0.0, 0.0]  # CPU and wall-clock seconds of converting and timing
    for batch, patched in ([(b, True) for b in _batches(fast, _BATCH_SIGNATURES)]
                           + [(b, False) for b in _batches(slow, _BATCH_SIGNATURES)]):
        requests = [p for _, p in batch] + [(reference, 64, 64)]
        outputs = [cout for _, _, cout in requests]
        seconds = None
        cpu, wall = time.thread_time(), time.perf_counter()
        if patched and id(reference) in patchable:
            try:
                seconds = where.time_copies(patcher, [(id(c), i, o) for c, i, o in requests],
                                            runs, outputs=outputs)
            except (ValueError, RuntimeError):
                seconds = None  # the copies did not prepare: convert this batch
        if seconds is None:
            seconds = where.time_models(layer_models(requests), runs, layers=True)
        *seconds, ref = seconds
        shares[0] += time.thread_time() - cpu
        shares[1] += time.perf_counter() - wall
        factor = cache.values.setdefault(_REFERENCE, ref) / ref
        for (key, _), s in zip(batch, seconds):
            cache.values[key] = s * factor
        cache.save()  # a long build loses nothing when stopped
        if bar is not None:
            bar.add(len(batch))
    if threads == 1:
        _check_share(*shares)
    return [cache.values[k] for k in keys]


SHARE_WARNING = 0.5  # measuring with less than this share of a core warns
_warned = []  # the load warning is said once per process


def _check_share(cpu, wall):
    """Warns (once) when other programs held the core for most of the measuring: one thread
    is timed in CPU time, which does not count that, but the caches they share still do."""
    if wall <= 1.0 or cpu / wall >= SHARE_WARNING or _warned:
        return
    _warned.append(True)
    warnings.warn(
        f"latency_table: other programs held this core {1 - cpu / wall:.0%} of the time "
        "while the table was measured; it is timed in CPU time, which does not count that, "
        "but caches shared with them may still slow some layers. If budgets on this table "
        "miss their latency, build it again on a quiet machine "
        "(latency_table(..., refresh=True)).", RuntimeWarning, stacklevel=4)


def measure_quantum(runtime="tflite", threads=1, cache_dir=None, runs=40, progress=False,
                    quantization=None):
    """The width step of the runtime's kernels on this machine (cached).

    Times a 1x1 convolution (56x56x128 input) at output widths 41..96. The
    quantum is the largest `q` in `QUANTA` for which rounding a width up to
    a multiple of `q` costs nothing:
    `latency(ceil(w / q) * q) / latency(w) - 1` is at most 5 % for 90 % of the
    widths; else 1.
    """
    import keras

    top = 96
    x = keras.Input(batch_shape=(1, 56, 56, 128))
    probe = keras.Model(x, keras.layers.Conv2D(top, 1, name="quantum_probe")(x))
    (call,) = kernel_calls(probe)
    widths = list(range(41, top + 1))
    seconds = dict(zip(widths, measure_points([(call, 128, w) for w in widths], runtime,
                                              threads, runs, cache_dir, progress,
                                              quantization)))
    for q in QUANTA:
        costs = [seconds[_round_up(w, q)] / seconds[w] - 1 for w in widths
                 if _round_up(w, q) <= top]
        if costs and float(np.percentile(costs, 90)) <= 0.05:
            return q
    return 1


def measure_fine_quantum(quantum, runtime="tflite", threads=1, cache_dir=None, runs=40,
                         progress=False, quantization=None):
    """A finer width alignment than `quantum` that costs what the next step costs (cached).

    Times a 3x3 depthwise convolution (28x28 input) at widths 41..96: the
    smallest `f` in `QUANTA` below `quantum` for which a width that is a
    multiple of `f` costs at most 5 % more than the next multiple of the
    quantum, for 90 % of such widths; 0 when there is none. ONNX Runtime's
    depthwise kernel on this CPU: 4 (a width of 44 costs what 48 does, 46
    twice that).
    """
    import keras

    top = 96
    x = keras.Input(batch_shape=(1, 28, 28, top))
    probe = keras.Model(x, keras.layers.DepthwiseConv2D(3, padding="same",
                                                        name="fine_probe")(x))
    (call,) = kernel_calls(probe)
    widths = list(range(41, top + 1))
    seconds = dict(zip(widths, measure_points([(call, w, w) for w in widths], runtime, threads,
                                              runs, cache_dir, progress, quantization)))
    for f in sorted(q for q in QUANTA if q < quantum and quantum % q == 0):
        costs = [seconds[w] / seconds[_round_up(w, quantum)] - 1 for w in widths
                 if w % f == 0 and w % quantum and _round_up(w, quantum) <= top]
        if costs and float(np.percentile(costs, 90)) <= 0.05:
            return f
    return 0


def measure_latency(model, runtime="tflite", threads=1, runs=30, quantization=None):
    """Median latency (seconds) of a whole model (stripped of PSP layers) on `runtime`,
    exported as `tf_psp.export` writes it (int8: calibrated on random inputs)."""
    from tf_psp import bench, export
    from tf_psp.shrink import strip

    target(runtime, threads, quantization)
    plain = strip(model)
    with tempfile.TemporaryDirectory(prefix="tf_psp_latency_") as tmp:
        if runtime == "onnxruntime":
            path = os.path.join(tmp, "model.onnx")
            export.export_onnx(plain, path)
            return float(np.median(bench.time_onnx(path, threads=threads, runs=runs)))
        path = os.path.join(tmp, "model.tflite")
        data = None
        if quantization == "int8":
            rng = np.random.default_rng(0)
            data = [rng.standard_normal((1,) + tuple(plain.inputs[0].shape[1:])).astype(
                np.float32) for _ in range(3)]
        export.export_tflite(plain, path, quantization=quantization, representative_data=data)
        return float(np.median(bench.time_tflite(path, num_threads=threads, runs=runs)))


def latency_table(model, runtime: str = "tflite", threads: int = 1, points: int = 5,
                  runs: int = 15, cache_dir=None, progress: bool = True,
                  quantum: int | None = None, refresh: bool = False,
                  quantization: str | None = None) -> LatencyTable:
    """Measures the latency table of `model`'s kernel layers on `runtime`.

    Args:
        model: a built functional or Sequential model (PSP or plain); not
            modified. Its input shape must be static (batch 1 is measured).
        runtime: `'tflite'` (LiteRT, XNNPACK) or `'onnxruntime'` (CPU
            execution provider); see `tf_psp.latency_targets`.
        threads: CPU threads of the runtime.
        points: grid points per width axis (in [0.1, 1] of the full width).
        runs: interleaved timing rounds per point (the minimum is kept).
        cache_dir: where measured points are cached (see `cache_directory`).
        progress: show a progress bar while measuring.
        quantum: the width step to tabulate at; None measures it
            (`measure_quantum`).
        refresh: measure again even when the cache holds a table of a model
            with this very architecture (weights do not matter to a float
            runtime's latency).
        quantization: None (float32) or `'int8'` (full-integer TFLite, as
            `export.export_tflite(quantization='int8')` writes it; the table
            is measured on random calibration inputs: weights and data do not
            change an int8 kernel's speed).

    Returns:
        A `LatencyTable`.
    """
    from tf_psp.shrink import strip

    check_model(model)
    where = target(runtime, threads, quantization)
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise ValueError(f"points must be an integer >= 2, got {points!r}.")
    started = time.perf_counter()
    if progress:
        print(f"latency_table: model '{model.name}' on {where.describe()}",
              file=sys.stderr, flush=True)
    plain = strip(model)
    machine = machine_id() + " | " + where.version()
    architecture = json.dumps([plain.to_json(), where.label, threads, points, runs, quantum,
                               machine, TABLE_VERSION])
    path = os.path.join(cache_directory(cache_dir), "tables",
                        hashlib.sha1(architecture.encode()).hexdigest() + ".json")
    if not refresh and os.path.exists(path):
        try:
            return LatencyTable.load(path)
        except (OSError, ValueError, TypeError):
            pass  # measure it again
    calls = kernel_calls(plain)
    if not calls:
        raise ValueError(f"model '{model.name}' has no kernel layer with a static input "
                         "shape to tabulate.")
    q = quantum or measure_quantum(runtime, threads, cache_dir, progress=progress,
                                   quantization=quantization)
    fine = measure_fine_quantum(q, runtime, threads, cache_dir, progress=progress,
                                quantization=quantization) if where.fine_alignment else 0
    requests, layout = [], {}
    for call in calls:
        aligned_in = where.input_alignment and not call.tied and call.cin > q
        cins = ([call.cin] if call.tied else
                list(width_grid(call.cin, q if aligned_in else 1, points - 1)))
        if call.cin not in cins:
            cins.append(call.cin)
        off_cins = [c - 1 for c in cins if c % q == 0 and c > q] if aligned_in else []
        steps = list(width_grid(call.cout if not call.tied else call.cin, q, points))
        top = call.cin if call.tied else call.cout
        if top % q:
            steps.append(_round_up(top, q))
        layout[call.name] = (call, cins, steps, off_cins,
                             _grid_requests(call, cins, steps, q, requests),
                             _grid_requests(call, off_cins, steps, q, requests))
    if progress:
        print(f"latency_table: {len(calls)} kernel layers at {len(requests)} widths, "
              f"quantum {q} (each layer converted once)", file=sys.stderr)
    seconds = measure_points(requests, runtime, threads, runs, cache_dir, progress,
                             quantization)
    layers = {}
    for name, (call, cins, steps, off_cins, (on, off), (in_on, in_off)) in layout.items():
        shape, off_shape = (len(cins), len(steps)), (len(off_cins), len(steps))
        layers[name] = LayerLatency(
            name=name, cin=call.cin, cout=call.cout, tied=call.tied, quantum=q,
            cins=[int(c) for c in cins], steps=[int(s) for s in steps],
            on=np.reshape([seconds[k] for k in on], shape).tolist(),
            off=np.reshape([seconds[k] for k in off], shape).tolist(), fine=fine,
            off_cins=[int(c) for c in off_cins],
            off_in_on=np.reshape([seconds[k] for k in in_on], off_shape).tolist(),
            off_in_off=np.reshape([seconds[k] for k in in_off], off_shape).tolist())
    table = LatencyTable(model=model.name, runtime=runtime, threads=threads,
                         machine=machine_id(), quantum=q, layers=layers,
                         dense_seconds=0.0, fixed_seconds=0.0, quantization=quantization,
                         fine_quantum=fine)
    if progress:
        print(f"latency_table: calibrating on {len(CALIBRATION) + 1 + where.input_alignment} "
              "whole models",
              file=sys.stderr)
    _calibrate(table, model, where, progress=progress, plain=plain)
    table.build_seconds = time.perf_counter() - started
    os.makedirs(os.path.dirname(path), exist_ok=True)
    table.save(path)
    return table


def _grid_requests(call, cins, steps, q, requests):
    """Appends the `(call, cin, cout)` points of the on- and off-quantum grids over `cins` x
    `steps` to `requests`; returns their indices `(on, off)`, row by row."""
    top = call.cin if call.tied else call.cout
    on, off = [], []
    for i in cins:
        for p in steps:
            for table, width in ((on, p), (off, _off_width(p, q, top))):
                width = min(width, top)
                cin = width if call.tied else i
                cout = width * (call.cout // call.cin) if call.tied else width
                table.append(len(requests))
                requests.append((call, cin, cout))
    return on, off


# The whole models the cost model is fitted on besides the dense one: (importance, keep_macs,
# round_to); see benchmarks/README.md (latency_model.py) for how well two do.
CALIBRATION = (("random", 0.6, 1), ("random", 0.3, "quantum"))


def _calibrate(table, model, where, selections=CALIBRATION, runs=50, progress=True,
               plain=None):
    """Fits `fixed_seconds` and `scale` on whole models measured interleaved.

    The models: dense, and one per `(importance, keep_macs, round_to)` in
    `selections` (`'uniform'`: all channel spaces shrunk alike by l1-norm;
    `'random'`: random channels; `round_to='quantum'`: widths on the
    table's quantum); `plain`: the model stripped of PSP layers, if at hand. They are
    converted together (as target `where` deploys a model) and timed
    interleaved (minimum of `runs` rounds: a whole model takes milliseconds,
    long enough for other work to interrupt most runs). The fit is a
    least-squares line through (sum of the tables, measured latency).
    """
    from tf_psp.coupling import parameterize_groups
    from tf_psp.group_alphas import has_alphas
    from tf_psp.layers import DEFAULT_EPSILON
    from tf_psp.plan import pruning_plan
    from tf_psp.shrink import strip, strip_and_shrink

    q = table.quantum
    if where.input_alignment:  # a third parameter (scale_off): one more model off the quantum
        selections = tuple(selections) + (("random", 0.3, 1),)
    psp = model if has_alphas(model) else parameterize_groups(
        model, DEFAULT_EPSILON, alpha_regularizer=None)[0]
    bar = _progress(2 * (len(selections) + 1), progress, unit="model")
    models = [("dense", plain if plain is not None else strip(psp))]
    if bar is not None:
        bar.add(1)
    plans = {}
    for importance, keep, round_to in selections:
        step = q if round_to == "quantum" else int(round_to)
        kind = "l1" if importance == "uniform" else importance
        if kind not in plans:  # one plan per importance: a plan takes seconds to make
            plans[kind] = pruning_plan(psp, importance=kind, seed=1000)
        plan = plans[kind]
        # A model that cannot shrink that far on the quantum (ResNet-56's 16-wide stage on
        # a quantum of 16) is fitted on a larger fraction: a line needs two widths.
        for fraction in (keep, keep + 0.2, keep + 0.4) if step > 1 else (keep,):
            try:
                units = plan.select(fraction, round_to=step)
            except ValueError:
                continue  # cannot shrink that far
            label = f"{importance} {fraction:.2g}{' on the quantum' if step > 1 else ''}"
            models.append((label, strip_and_shrink(plan.apply(units))))
            break
        if bar is not None:
            bar.add(1)
    if bar is not None:
        bar.add(len(models) - 1)
    measured = np.array(where.time_models([m for _, m in models], runs))
    if bar is not None:
        bar.add(1)
    widths = [{c.name: (c.cin, c.cout) for c in kernel_calls(m)} for _, m in models]
    parts = np.array([table.table_sums(w) for w in widths])
    sums = parts.sum(axis=1)
    if where.input_alignment and len(models) >= 3 and parts[:, 1].any():
        (fixed, scale, scale_off), *_ = np.linalg.lstsq(
            np.column_stack([np.ones(len(models)), parts]), measured, rcond=None)
        table.scale_off = float(scale_off)
    elif len(models) >= 2:
        scale, fixed = np.polyfit(sums, measured, 1)
    else:
        scale, fixed = 1.0, measured[0] - sums[0]
    table.scale, table.fixed_seconds = float(scale), float(fixed)
    table.dense_seconds = float(measured[0])
    table.calibration = []
    for (label, _), w, t, seconds in zip(models, widths, sums, measured):
        table.calibration.append({"model": label, "table_sum": float(t),
                                  "measured": float(seconds),
                                  "predicted": table.predict_widths(w)})


def table_for_budget(model, table, keep_latency, round_to, runtime="tflite", threads=1,
                     progress=True, quantization=None):
    """`(table, round_to)` for a budget: `table`, or the model's (built or read from the
    cache) when `keep_latency` or `round_to='auto'` needs one, else None; `round_to='auto'`
    resolved to the table's quantum."""
    target(runtime, threads, quantization)  # a bad runtime fails before any training
    if table is None and (keep_latency is not None or round_to == "auto"):
        table = latency_table(model, runtime=runtime, threads=threads, progress=progress,
                              quantization=quantization)
    if round_to == "auto":
        round_to = int(table.quantum)
    return table, round_to


def plot_table(table, path, top=12):
    """Plots latency vs output width of each layer of `table` to a PNG (atomically).

    One line per layer (full input width, on-quantum widths solid, the width
    just below each step dotted); the `top` slowest layers are labelled.
    Needs matplotlib (`pip install tf_psp[bench]`).
    """
    try:
        import matplotlib
    except ImportError as error:  # pragma: no cover - depends on the extra
        raise ImportError("plot_table needs matplotlib: pip install 'tf_psp[bench]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = sorted(table.layers.values(), key=lambda e: -e.seconds(e.cin, e.cout))
    fig, ax = plt.subplots(figsize=(8, 5))
    for rank, e in enumerate(entries):
        top_width = e.cin if e.tied else e.cout
        xs = [s / top_width for s in e.steps]
        label = (f"{e.name} ({e.cin}->{e.cout})" if rank < top else None)
        line, = ax.plot(xs, [table.scale * v * 1e3 for v in e.on[-1]], "-", lw=1, label=label)
        if e.quantum > 1:
            ax.plot([(s - 1) / top_width for s in e.steps],
                    [table.scale * v * 1e3 for v in e.off[-1]], ":", lw=1,
                    color=line.get_color())
    ax.set_xlabel("output width / full width (dotted: one channel below a step)")
    ax.set_ylabel("latency in the model (ms, table x scale)")
    ax.set_title(f"{table.model}: {table.runtime}, {table.threads} thread(s), "
                 f"quantum {table.quantum}")
    ax.legend(fontsize=6, loc="upper left")
    with atomic.temp_file_beside(os.fspath(path), suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
