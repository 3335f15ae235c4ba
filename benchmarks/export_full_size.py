"""Full-size DiT denoiser export (bf16), the builder's route: graph from the meta device, weights
streamed into one external-data file. No checkpoint is needed: the weights come from a lazy
mapping that makes each tensor when it is written (as a checkpoint read would), so this measures
the export route's own time and peak RAM at full size. Usage:

    python benchmarks/export_full_size.py /tmp/denoiser.onnx   # needs ~12 GB of free disk
"""
import resource, time, sys
from collections.abc import Mapping
import torch
from zimage_trt.build_engines.networks import networks, ShapePoint
from zimage_trt.build_engines.onnx_export import export_network
from zimage_trt.build_engines.profiles import workflow_stages, engine_profiles, caption_span, limits
from zimage_trt.models.dit import DiTConfig, ZImageDiT, RopeTables, rope_table_lengths
from zimage_trt.models.text_encoder import Qwen3Config
from zimage_trt.models.vae import VAEConfig
from zimage_trt.workflow import load_workflow

class LazyRandom(Mapping):
    """name → a fresh random tensor of the module's shape, made on demand (like a checkpoint read)."""
    def __init__(self, module, extra):
        self.shapes = {n: (p.shape, p.dtype) for n, p in module.named_parameters()}
        self.extra = extra
    def __getitem__(self, k):
        if k in self.extra: return self.extra[k]
        shape, dtype = self.shapes[k]
        return (torch.randn(shape) * 0.02).to(dtype)
    def __iter__(self): return iter([*self.shapes, *self.extra])
    def __len__(self): return len(self.shapes) + len(self.extra)

cfg = DiTConfig()
nets = networks("bf16", cfg, Qwen3Config(), VAEConfig())
prof = engine_profiles({"denoiser": nets["denoiser"]}, workflow_stages(load_workflow("zimage-121101")), caption_span(4096, 32))["denoiser"]
lim = limits(prof, nets["denoiser"])
lengths = rope_table_lengths(lim.tokens, lim.height, lim.width)
with torch.device("meta"):
    meta = ZImageDiT(cfg).to(torch.bfloat16)
    meta.rope_tables = RopeTables(cfg, lengths)
tables = RopeTables(cfg, lengths)
extra = {f"rope_tables.{n}": b for n, b in tables.named_buffers()}
t = time.time()
res = export_network(nets["denoiser"], meta, LazyRandom(meta, extra), __import__("pathlib").Path(sys.argv[1]),
                     example=ShapePoint(2, 40, 12, 10), limits=lim, log=print)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(f"params {sum(p.numel() for p in meta.parameters())/1e9:.3f} B; {res.initializers} weights, {res.data_bytes/2**30:.2f} GiB data; {time.time()-t:.0f} s; peak RSS {rss:.2f} GiB")
import onnx
from zimage_trt.build_engines.coverage import check_tensorrt_coverage
t=time.time(); onnx.checker.check_model(sys.argv[1]); rep = check_tensorrt_coverage(sys.argv[1])
print("checker ok;", rep.summary(), f"{time.time()-t:.0f} s")
