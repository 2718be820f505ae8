"""`tv/<name>`: torchvision's classification models (`torchvision.models.list_models(module=torchvision.models)`),
built by `torchvision.models.get_model`, with kdpipe's `features=True` added.

The model IS torchvision's: its class is swapped for a subclass that only adds the `features` argument
(`forward(x)` is torchvision's own), so `state_dict()` keys, parameter counts and `isinstance` stay the
library's and a torchvision state dict loads as is. The feature taps come from torchvision's FX feature
extraction (`get_graph_node_names`, `create_feature_extractor`) when the model is built: the taps are picked
from the shapes of the graph's nodes (below), and the train and eval graphs that return them are compiled
into functions called with the model as `self`. They hold no module of their own, so `deepcopy`, `.to()`
and SyncBatchNorm's module swaps keep working (`torch.save(model)` of the whole module does not: save
its `state_dict()`).

Taps, picked generically from the eval-mode graph, its shapes run on the meta device at the model's input
size (224, or its `image_size`):
- `stages`: one map per stride (2, 4, 8, 16, 32): at each, the last output of the outermost module (a
  stage's or block's output, not a node of the next block before its strided conv), up to the head, as
  timm's `feature_info` picks them. resnet: `relu` (the stem after its ReLU, before the max pool),
  `layer1`..`layer4`; mobilenet/efficientnet/mnasnet: the last block of `features` at each stride;
  convnext: each stage's last block; vgg/alexnet: the last ReLU or max pool at each stride; densenet:
  each transition's pool and the final ReLU. Transformers give the few NCHW maps their graph has
  (vit: the patch embedding only; swin: the patch embedding and the last stage): for stage-wise methods
  use `timm/` for those.
- `embedding`: the first (B, D) tensor on the way to the logits, i.e. the pooled, flattened vector the
  classifier block reads (mobilenet_v3: the 576/960-d input of Linear-Hardswish-Dropout-Linear, not its
  hidden layer; vgg: the 25088-d flattened map); squeezenet (a conv classifier): the last stage pooled.
- `preact`: a stage tap that is a ReLU (resnets, densenet, vgg) gives its input (cloned before an in-place
  ReLU overwrites it); the stem's tap and the others repeat `stages`.

`weights`: None (the architecture's own init), a torchvision weights name (`IMAGENET1K_V1`, `DEFAULT`, ...;
downloaded through torch.hub's cache, `$TORCH_HOME/hub/checkpoints`), or a state-dict file (.pth/.pt/
.safetensors) in torchvision's key layout. A classifier for another class count is replaced by a new
one (the library's own init, for fine-tuning), with one line on stderr.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import sys
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from .base import Features, is_weights_file
from .library import WeightsError, add_mixin, head_keys, note_new_head, read_state_dict

PREFIX = "tv/"


# ---- building ----

def names() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def check_name(name: str) -> None:
    if name not in names():
        raise ValueError(f"unknown model {PREFIX + name!r}; e.g. tv/resnet18, tv/mobilenet_v3_small, tv/efficientnet_b0 "
                         "(see torchvision.models.list_models(module=torchvision.models))")


def create(name: str, num_classes: int, weights: str | None = None) -> nn.Module:
    """torchvision's `name` for `num_classes` classes, with `weights` (see the module docstring)."""
    label = PREFIX + name
    check_name(name)
    if weights is None:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    elif is_weights_file(weights):
        model = _from_file(label, name, num_classes, weights)
    else:
        model = _from_named(label, name, num_classes, weights)
    return _with_features(model)


def _from_file(label: str, name: str, num_classes: int, path: str) -> nn.Module:
    sd = read_state_dict(label, path)
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    try:
        head = head_keys(model.state_dict(), sd, num_classes)
    except WeightsError as e:
        raise WeightsError(f"{label}: {path} does not fit: {e}") from None
    classes = sd[head[0]].shape[0] if head else num_classes
    missing, unexpected = model.load_state_dict({k: v for k, v in sd.items() if k not in head}, strict=False)
    missing = [k for k in missing if k not in head]
    if missing or unexpected:
        raise WeightsError(f"{label}: {path} does not fit: missing keys {missing[:3]}, unexpected keys "
                           f"{unexpected[:3]} (a state dict in torchvision's layout is expected)")
    if head:
        note_new_head(label, path, classes, num_classes)
    return model


def _resolve(label: str, name: str, weights: str):
    """The torchvision weights enum member a weights name means."""
    enum = torchvision.models.get_model_weights(name)
    tag = weights.removeprefix(enum.__name__ + ".")
    valid = ["DEFAULT"] + [w.name for w in enum]
    if tag not in valid:
        raise WeightsError(f"{label}: unknown weights {weights!r}; valid: {', '.join(valid)} "
                           "or a .pth/.safetensors file")
    return enum[tag]


def weights_classes(name: str, weights: str) -> int:
    """The class count of the named weights' classifier (without loading them)."""
    return len(_resolve(PREFIX + name, name, weights).meta["categories"])


def _cached(label: str, w) -> str:
    """torch.hub's cache file of weights `w`, downloaded if absent, its sha256 checked against the prefix in its
    name (`-f37072fd.pth`) either way: torch.hub checks it on download only, and trusts whatever file is there
    (a user's offline copy, a truncated download). Absent and offline: one line saying where to put the file,
    without torch.hub's "Downloading: ..." line before it."""
    filename = os.path.basename(urlparse(w.url).path)
    file = os.path.join(torch.hub.get_dir(), "checkpoints", filename)
    match = torch.hub.HASH_REGEX.search(filename)
    prefix = match.group(1) if match else None
    if not os.path.exists(file):
        os.makedirs(os.path.dirname(file), exist_ok=True)
        try:  # checks the hash and leaves no file when it differs
            torch.hub.download_url_to_file(w.url, file, prefix, progress=sys.stderr.isatty())
        except OSError as e:  # urllib's URLError, no space, ...
            raise WeightsError(f"{label}: cannot download {w.url} ({e.__class__.__name__}: {getattr(e, 'reason', e)}); "
                               f"offline, put that file at {file}") from None
        except RuntimeError as e:  # torch.hub: 'invalid hash value'
            raise WeightsError(f"{label}: the download of {w.url} is corrupt ({e})") from None
    elif prefix:
        digest = hashlib.sha256()
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if not digest.hexdigest().startswith(prefix):
            raise WeightsError(f"{label}: {file} is not torchvision's {w.name} file: its sha256 does not start with "
                               f"{prefix} (the hash in its name); delete it to download it again, or put the "
                               f"original from {w.url} there")
    return file


def _from_named(label: str, name: str, num_classes: int, weights: str) -> nn.Module:
    w = _resolve(label, name, weights)
    file = _cached(label, w)
    try:
        model = torchvision.models.get_model(name, weights=w)  # torchvision's own loading, from the cache file
    except OSError as e:  # unreadable file
        raise WeightsError(f"{label}: the cached {file} does not load ({type(e).__name__}: {e})") from None
    except (RuntimeError, pickle.UnpicklingError) as e:
        raise WeightsError(f"{label}: the cached {file} does not load ({type(e).__name__}); delete it to "
                           "download it again") from None
    classes = len(w.meta["categories"])
    if classes != num_classes:
        # the classifier's modules are swapped for those of a model built for `num_classes`: the library's own
        # init, and everything else of the pretrained model kept (e.g. inception's transform_input)
        fresh = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        for module in dict.fromkeys(k.rsplit(".", 1)[0] for k in head_keys(fresh.state_dict(), model.state_dict(),
                                                                           num_classes)):
            model.set_submodule(module, fresh.get_submodule(module))
        note_new_head(label, w.name, classes, num_classes)
    return model


# ---- features ----

class _TvFeatures:
    """Mixed into torchvision's class: `features=True` runs the graph that also returns the taps."""

    def forward(self, x, features: bool = False):
        if not features:
            return super().forward(x)
        taps = self._kd_taps
        out = taps.graphs[self.training](self, x)
        stages = [out[k] for k in taps.stages]
        preact = [out[p or k] for k, p in zip(taps.stages, taps.preact)]
        if taps.embedding:
            embedding = out[taps.embedding]
        else:
            embedding = torch.flatten(F.adaptive_avg_pool2d(stages[-1], 1), 1)
        # a ResNet's embedding is the global average of its last tap (layer4's output), read by `fc`
        final = stages[-1] if isinstance(self, torchvision.models.ResNet) else None
        return Features(out[taps.logits], stages, embedding, preact, final=final)

    @property
    def CLASSIFIER(self) -> str | None:  # noqa: N802  (models.classifier's name of the layer on the embedding)
        return "fc" if isinstance(self, torchvision.models.ResNet) else None

    def bn_before_relu(self) -> list[nn.BatchNorm2d]:
        """ResNets: the last block's last BN of each layer, whose output (plus the shortcut) is that layer's preact
        tap (OFD's margins); the other torchvision families have none that kdpipe knows."""
        if not isinstance(self, torchvision.models.ResNet):
            raise AttributeError(f"{type(self).__name__}: no BN-before-ReLU taps known")
        return [getattr(layer[-1], "bn3", None) or layer[-1].bn2 for layer in (self.layer1, self.layer2, self.layer3, self.layer4)]


class _Taps:
    """The chosen node names and the two compiled graphs (eval, train). Shared, never copied: it holds no tensor."""

    def __init__(self, stages, preact, embedding, logits, graphs):
        self.stages, self.preact, self.embedding, self.logits, self.graphs = stages, preact, embedding, logits, graphs

    def __deepcopy__(self, memo):
        return self


def _with_features(model: nn.Module) -> nn.Module:
    taps = _trace_taps(model)  # traced before the swap: fx would see the `features` argument
    add_mixin(model, _TvFeatures)._kd_taps = taps
    return model


def _is(node, model, modules: tuple, functions: tuple, methods: tuple = ()) -> bool:
    if node.op == "call_module":
        return isinstance(model.get_submodule(node.target), modules)
    if node.op == "call_function":
        return node.target in functions
    return node.op == "call_method" and node.target in methods


def _is_relu(node, model) -> bool:
    return _is(node, model, (nn.ReLU,), (F.relu, torch.relu, torch.relu_, F.relu_), ("relu", "relu_"))


def _is_adaptive_pool(node, model) -> bool:
    return _is(node, model, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d),
               (F.adaptive_avg_pool2d, F.adaptive_max_pool2d))


def _ancestors(node) -> set:
    seen, todo = set(), [node]
    while todo:
        for a in todo.pop().all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return seen


def _output(graph):
    return next(n for n in reversed(graph.nodes) if n.op == "output")


def _trace_taps(model: nn.Module) -> _Taps:
    """Pick the taps from the shapes of every node of the eval graph (run on the meta device: no compute),
    then compile the graphs that return them."""
    before, was_training = set(vars(model)), model.training  # fx stores tensor constants it meets on the model
    train_nodes, eval_nodes = get_graph_node_names(model, suppress_diff_warning=True)
    probe = create_feature_extractor(model, train_return_nodes=train_nodes[-1:], eval_return_nodes=eval_nodes,
                                     suppress_diff_warning=True).eval()
    size = getattr(model, "image_size", 224)
    meta = {k: v.to("meta") for k, v in [*probe.named_parameters(), *probe.named_buffers()]}
    with torch.no_grad():
        values = torch.func.functional_call(probe, meta, (torch.zeros(2, 3, size, size, device="meta"),))
    model.train(was_training)  # the probe shares the model's modules
    node = dict(_output(probe.graph).args[0])  # node name -> fx node, in execution order
    name = {n: k for k, n in node.items()}
    logits = eval_nodes[-1]
    upstream = _ancestors(node[logits])

    def shape(k):
        v = values.get(k)
        return tuple(v.shape) if isinstance(v, torch.Tensor) and v.shape[:1] == (2,) else ()

    embedding = next((k for k in node if node[k] in upstream and len(shape(k)) == 2), None)
    ends = {}  # dotted name prefix -> the last node under it: a node that ends a module is that module's output
    for k in eval_nodes:
        parts = k.split(".")
        for i in range(1, len(parts) + 1):
            ends[".".join(parts[:i])] = k
    candidates, top = {}, 1  # stride level (log2) -> [(depth of the outermost module the node ends, name)]
    for k, n in node.items():
        s = shape(k)
        if n not in upstream or n.op not in ("call_module", "call_function", "call_method") or len(s) != 4:
            continue
        if s[2] != s[3] or s[2] < 2 or _is_adaptive_pool(n, model):  # NHWC maps, pooled vectors, the head's pool
            continue
        level = round(math.log2(size / s[2]))
        if level >= top:  # a map at a smaller stride than one before it is no stage (e.g. an upsampling)
            parts = k.split(".")
            depth = min(i for i in range(1, len(parts) + 1) if ends[".".join(parts[:i])] == k)
            candidates.setdefault(level, []).append((depth, k))
            top = level
    # per stride, the last output of the outermost module: a stage's or block's output, not a node inside the
    # next block that runs at the old stride until its strided conv (resnet50's layer2.0.conv1, mobilenet's
    # expansion convs)
    stages = [[k for d, k in c if d == min(c)[0]][-1] for c in candidates.values()]
    preact = [None] + [name.get(node[k].args[0]) if _is_relu(node[k], model) else None for k in stages[1:]]
    wanted = list(dict.fromkeys(stages + [p for p in preact if p] + ([embedding] if embedding else []) + [logits]))
    extractor = create_feature_extractor(model, return_nodes=wanted, suppress_diff_warning=True)
    graphs = tuple(_compile(g, [p for p in preact if p]) for g in (extractor.eval_graph, extractor.train_graph))
    used = {n.target for g in (extractor.eval_graph, extractor.train_graph) for n in g.nodes if n.op == "get_attr"}
    for attr in set(vars(model)) - before:  # keep the constants the graphs read, as buffers outside the state dict
        value = vars(model).pop(attr)
        if attr in used:
            model.register_buffer(attr, value, persistent=False)
    return _Taps(stages, preact, embedding, logits, graphs)


def _compile(graph, clone: list[str]):
    """The graph's code as a function of (model, x): clones of the pre-ReLU taps are taken before the ReLU."""
    out = _output(graph)
    returned = dict(out.args[0])
    for k in clone:
        with graph.inserting_after(returned[k]):
            returned[k] = graph.call_function(torch.clone, (returned[k],))
    out.args = (returned,)
    code = graph.python_code(root_module="self")
    namespace = dict(code.globals)
    exec(compile(code.src, f"<kdpipe tv features {id(graph)}>", "exec"), namespace)
    return namespace["forward"]
