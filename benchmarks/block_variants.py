"""One UNet Block (XS's 64x64 level shape, bf16) in several forms, on one GPU: the reproducer of the
"CUDA error: misaligned address" of `--compile` under DeepSpeed, and a micro-benchmark of eager,
fused (sida_edm2.model.mp_fused) and compiled blocks.

    python benchmarks/block_variants.py misaligned-second    # crashes if the bug is present
    python benchmarks/block_variants.py time                 # ms per forward+backward of each form

The suspected construct: DeepSpeed ZeRO-1/2 packs a network's bf16 parameters back to back into one
flat buffer, so after a 1-element gain every later parameter starts 2 bytes off a 16-byte boundary.
Inductor treats parameters as static inputs: when it compiles a graph with aligned ones it emits Triton
code that assumes 16-byte alignment and skips its runtime alignment check for them; dynamo then reuses
that graph for every structurally identical Block, including ones whose parameters are misaligned.
Variants (each its own process: a CUDA error poisons the context):
  aligned             both blocks' parameters 16-byte aligned (control)
  misaligned-second   the compiled graph is built on an aligned block, then run on a packed one
  misaligned-first    the same, packed block first (the graph then assumes nothing)
  no-hints            misaligned-second compiled with the Triton divisibility hints off
  no-inline           misaligned-second with dynamo's inline_inbuilt_nn_modules off
  deepspeed-module-order  the real case: a small UNet under a DeepSpeed ZeRO-2 bf16 engine whose
                      optimizer lists the parameters in module order, every block compiled
  deepspeed           the same through sida_edm2.train.engines.make_engine (parameters in aligned_order)
  time                eager, fused and compiled (hints off) blocks: ms per forward + backward
"""

import sys
import time

import torch

from sida_edm2.model import speed
from sida_edm2.model.networks import Block

BATCH, CHANNELS, EMB, RES = 64, 128, 512, 64  # XS: 128 channels at 64x64, embedding 512


def flat_views_(module: torch.nn.Module, packed: bool) -> torch.Tensor:
    """Re-point module's parameters at bf16 views of one flat buffer, as DeepSpeed's working copy:
    `packed` back to back (misaligned after the first odd-sized one), else each at a multiple of 8."""
    params = list(module.parameters())
    sizes = [p.numel() if packed else -(-p.numel() // 8) * 8 for p in params]
    flat = torch.zeros(sum(sizes), dtype=torch.bfloat16, device="cuda")
    offset = 0
    for param, size in zip(params, sizes, strict=True):
        view = flat[offset : offset + param.numel()]
        view.copy_(param.data.reshape(-1))
        param.data = view.view(param.shape)
        offset += size
    return flat


def make_block(packed: bool) -> Block:
    torch.manual_seed(0)
    block = Block(CHANNELS, CHANNELS, EMB, flavor="enc").cuda()
    with torch.no_grad():
        block.emb_gain.fill_(1.0)
    block.flat = flat_views_(block, packed)
    return block


def step(block: Block, x: torch.Tensor, emb: torch.Tensor) -> None:
    block(x, emb).float().square().mean().backward()


def crash_test(variant: str) -> None:
    options = {"triton.divisible_by_16": False} if variant == "no-hints" else None
    if variant == "no-inline":
        torch._dynamo.config.inline_inbuilt_nn_modules = False
    packed = {"aligned": (False, False), "misaligned-first": (True, False)}.get(variant, (False, True))
    blocks = [make_block(p) for p in packed]
    for block in blocks:
        block.forward = torch.compile(block.forward, dynamic=False, options=options)
    x = torch.randn(BATCH, CHANNELS, RES, RES, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    emb = torch.randn(BATCH, EMB, device="cuda")
    for index, block in enumerate(blocks):
        step(block, x, emb)
        torch.cuda.synchronize()
        print(f"{variant}: block {index} (packed={packed[index]}) ran", flush=True)
    print(f"{variant}: OK")


def deepspeed_test(variant: str) -> None:
    from sida_edm2.model.networks import Precond
    from sida_edm2.train import engines

    engines.init_distributed()
    torch.manual_seed(0)
    net = Precond(
        img_resolution=32, img_channels=4, label_dim=10, model_channels=64, channel_mult=[1, 2],
        num_blocks=2, attn_resolutions=[16],
    ).cuda()  # fmt: skip
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name.endswith("_gain"):
                param.fill_(1.0)
    net.compute_dtype = torch.bfloat16
    config = engines.build_ds_config(
        engines.load_ds_config(2), batch_gpu=8, rounds=1, world_size=1, precision="bf16"
    )
    if variant == "deepspeed-module-order":
        deepspeed = engines.import_deepspeed()
        engines.scalar_params_to_1d_(net)
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
        engine, *_ = deepspeed.initialize(model=net, optimizer=optimizer, config=config)
    else:
        engine = engines.make_engine(net, config, lr=1e-4, betas=(0.9, 0.99), eps=1e-8)
    misaligned = [n for n, p in engine.module.named_parameters() if p.numel() % 8 == 0 and p.data_ptr() % 16]
    print(f"{variant}: {len(misaligned)} weights off 16-byte alignment", flush=True)
    print(f"{variant}: compiled {speed.compile_blocks(engine.module)} blocks", flush=True)
    x = torch.randn(8, 4, 32, 32, device="cuda")
    labels = torch.nn.functional.one_hot(torch.arange(8, device="cuda"), 10).float()
    for _ in range(2):
        engine.backward(engine(x, torch.ones(8, device="cuda"), labels).square().mean())
        engine.step()
    torch.cuda.synchronize()
    print(f"{variant}: OK")


def timing() -> None:
    x = torch.randn(BATCH, CHANNELS, RES, RES, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    emb = torch.randn(BATCH, EMB, device="cuda")
    for form in ("eager", "eager-cl", "fused", "fused-cl", "compiled-nohints", "compiled-cl-nohints"):
        block = make_block(packed=True)
        xin = x.detach().contiguous(memory_format=torch.channels_last) if "cl" in form else x.detach()
        xin.requires_grad_(True)
        speed.set_fused(block, form.startswith("fused"))
        if form.startswith("compiled"):
            block.forward = torch.compile(
                block.forward, dynamic=False, options={"triton.divisible_by_16": False}
            )
        for _ in range(3):
            step(block, xin, emb)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(20):
            step(block, xin, emb)
        torch.cuda.synchronize()
        print(
            f"time {form}: {(time.perf_counter() - start) / 20 * 1e3:.2f} ms per forward+backward", flush=True
        )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    if sys.argv[1] == "time":
        timing()
    elif sys.argv[1].startswith("deepspeed"):
        deepspeed_test(sys.argv[1])
    else:
        crash_test(sys.argv[1])
