"""Image prompts on a whole diffusers pipeline: same pixels as diffusers' built-in IP-Adapter, per-sample references."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from PIL import Image
from tiny_models import make_sd_folder

from ipadapter import IPAdapter, ImageEncoder
from ipadapter.prompter import ImagePrompt, ImagePrompter


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    base, encoder = make_sd_folder(root)
    return base, encoder, root


@pytest.fixture(scope="module")
def compact_folders(tmp_path_factory):
    """The same with a 4-layer UNet: tracing 16 layers for each graph of a compile test costs a minute on CI."""
    root = tmp_path_factory.mktemp("compact")
    base, encoder = make_sd_folder(root, compact=True)
    return base, encoder, root


def _pipes(base, encoder_folder):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    ours = StableDiffusionPipeline.from_pretrained(base)
    theirs = StableDiffusionPipeline.from_pretrained(
        base, image_encoder=CLIPVisionModelWithProjection.from_pretrained(encoder_folder),
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
    )
    for p in (ours, theirs):
        p.scheduler = DDIMScheduler.from_config(p.scheduler.config)  # deterministic sampling (DDPM adds noise)
        p.set_progress_bar_config(disable=True)
    return ours, theirs


@pytest.mark.parametrize("variant", ["base", "plus"])
def test_same_pixels_as_diffusers_builtin_ip_adapter(folders, tmp_path, variant):
    base, encoder_folder, _ = folders
    ours, theirs = _pipes(base, encoder_folder)
    encoder = ImageEncoder.from_pretrained(encoder_folder)
    torch.manual_seed(0)
    adapter = IPAdapter.for_unet(ours.unet, variant, image_embed_dim=encoder.feature_dim(
        "pooled" if variant == "base" else "penultimate"))
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.05 * torch.randn_like(p))
    adapter.save(tmp_path / "ip.bin", layout="official")
    theirs.load_ip_adapter(str(tmp_path), subfolder="", weight_name="ip.bin", image_encoder_folder=None)
    reference = Image.effect_mandelbrot((40, 30), (-2, -1.2, 1, 1.2), 20).convert("RGB")
    prompter = ImagePrompter(ours, IPAdapter.from_file(tmp_path / "ip.bin"), encoder)
    for scale, prompt in ((1.0, ""), (0.5, "a red shape")):
        theirs.set_ip_adapter_scale(scale)
        kwargs = {"prompt": prompt, "num_inference_steps": 3, "output_type": "np", "num_images_per_prompt": 2}
        expected = theirs(ip_adapter_image=reference, generator=torch.Generator("cpu").manual_seed(1), **kwargs).images
        found = prompter(image=reference, scale=scale, generator=torch.Generator("cpu").manual_seed(1), **kwargs).images
        assert abs(expected - found).max() <= 1e-5
    prompter.detach()
    plain = ours(prompt="", num_inference_steps=3, output_type="np", generator=torch.Generator("cpu").manual_seed(1)).images
    assert abs(plain - found[:1]).max() > 1e-3  # the adapter really acted
    with pytest.raises(ValueError, match=r"diffusers' own IP-Adapter loaded \(pipe.load_ip_adapter\): call "
                                         r"pipe.unload_ip_adapter\(\) before"):  # fmt: skip
        ImagePrompter(theirs, IPAdapter.from_file(tmp_path / "ip.bin"), encoder)  # both would act on the layers


def test_each_prompt_keeps_its_own_reference(folders):
    """diffusers issue #9813 mixes per-sample references across a batch; one batch must equal separate calls."""
    base, encoder_folder, _ = folders
    ours, _ = _pipes(base, encoder_folder)
    encoder = ImageEncoder.from_pretrained(encoder_folder)
    torch.manual_seed(0)
    adapter = IPAdapter.for_unet(ours.unet, "base", image_embed_dim=encoder.pooled_dim)
    prompter = ImagePrompter(ours, adapter, encoder)
    refs = [Image.new("RGB", (28, 28), c) for c in ("red", "blue")]
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    common = {"num_inference_steps": 3, "output_type": "np"}
    batch = prompter(image=refs, prompt=["a shape", "a shape"], latents=latents.repeat(2, 1, 1, 1), **common).images
    for i, ref in enumerate(refs):
        single = prompter(image=ref, prompt="a shape", latents=latents, **common).images
        assert abs(single[0] - batch[i]).max() <= 1e-5
    assert abs(batch[0] - batch[1]).max() > 1e-3
    with pytest.raises(ValueError, match=r"this adapter \(base\) needs a reference image"):
        prompter(prompt="a shape", **common)
    with pytest.raises(ValueError, match=r"face_id was given but this adapter \(base\) takes no face embeddings"):
        prompter(image=refs[0], face_id=torch.randn(512), prompt="a shape", **common)  # would be silently ignored
    with pytest.raises(ValueError, match="negative_image and negative_noise both choose the unconditional image"):
        prompter(image=refs[0], negative_image=refs[1], negative_noise=0.3, prompt="a shape", **common)


def _perturbed_base_adapter(folders):
    """Our pipeline with a base adapter whose weights are moved off the to_k/to_v copies (so that it acts)."""
    base, encoder_folder, _ = folders
    ours, _ = _pipes(base, encoder_folder)
    encoder = ImageEncoder.from_pretrained(encoder_folder)
    torch.manual_seed(0)
    adapter = IPAdapter.for_unet(ours.unet, "base", image_embed_dim=encoder.pooled_dim)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return ours, adapter, encoder


def test_step_window(folders):
    """0..0 is exactly no adapter; 0..1 is exactly the default; a partial window lies in between."""
    ours, adapter, encoder = _perturbed_base_adapter(folders)
    reference = Image.new("RGB", (28, 28), "red")
    common = {"prompt": "a shape", "num_inference_steps": 4, "output_type": "np"}

    def run(**kw):
        return prompter(image=reference, generator=torch.Generator("cpu").manual_seed(2), **common, **kw).images

    prompter = ImagePrompter(ours, adapter, encoder)
    full, default, late = run(start=0.0, end=1.0), run(), run(start=0.5, end=1.0)
    none = run(start=0.0, end=0.0)
    prompter.detach()
    plain = ours(generator=torch.Generator("cpu").manual_seed(2), **common).images
    assert (none == plain).all()
    assert (full == default).all()
    assert abs(late - full).max() > 1e-4 and abs(late - plain).max() > 1e-4
    with pytest.raises(ValueError, match=r"expected 0 <= start <= end <= 1, found start=0.8, end=0.2"):
        adapter.state.set_window(0.8, 0.2)


def test_diffusers_scale_cutoff_callback_is_a_window_one_step_longer(folders, tmp_path):
    """IPAdapterScaleCutoffCallback(cutoff_step_ratio=r) zeroes the scale after step int(N r): end=(int(N r)+1)/N."""
    from diffusers.callbacks import IPAdapterScaleCutoffCallback

    ours, adapter, encoder = _perturbed_base_adapter(folders)
    _, theirs = _pipes(*folders[:2])
    adapter.save(tmp_path / "ip.bin", layout="official")
    theirs.load_ip_adapter(str(tmp_path), subfolder="", weight_name="ip.bin", image_encoder_folder=None)
    reference = Image.effect_mandelbrot((40, 30), (-2, -1.2, 1, 1.2), 20).convert("RGB")
    common = {"prompt": "a shape", "num_inference_steps": 4, "output_type": "np"}
    prompter = ImagePrompter(ours, IPAdapter.from_file(tmp_path / "ip.bin"), encoder)
    try:
        for ratio in (0.25, 0.5):
            theirs.set_ip_adapter_scale(0.8)  # (the callback leaves it at 0)
            expected = theirs(ip_adapter_image=reference, generator=torch.Generator("cpu").manual_seed(1),
                              callback_on_step_end=IPAdapterScaleCutoffCallback(cutoff_step_ratio=ratio),
                              **common).images  # fmt: skip
            found = prompter(image=reference, scale=0.8, end=(int(4 * ratio) + 1) / 4,
                             generator=torch.Generator("cpu").manual_seed(1), **common).images  # fmt: skip
            assert abs(expected - found).max() <= 1e-5, ratio
    finally:
        prompter.detach()


def test_a_concat_adapter_acts_on_the_steps_of_its_window(folders):
    """The step is known before a concat adapter appends its tokens: with start=0.5 of 4 steps exactly the UNet
    calls of steps 2 and 3 get the image tokens (the tracker used to run after the adapter's pre-hook, so the window
    was judged on the previous step's index and step 0 always got them)."""
    ours, _ = _pipes(*folders[:2])
    encoder = ImageEncoder.from_pretrained(folders[1])
    adapter = IPAdapter.for_unet(ours.unet, "concat", image_embed_dim=encoder.pooled_dim)
    prompter = ImagePrompter(ours, adapter, encoder)
    lengths = []
    spy = ours.unet.register_forward_pre_hook(
        lambda m, args, kwargs: lengths.append(kwargs["encoder_hidden_states"].shape[1]), with_kwargs=True)
    reference = Image.new("RGB", (28, 28), "red")
    for (start, end), acting in (((0.5, 1.0), [2, 3]), ((0.0, 0.5), [0, 1])):
        lengths.clear()
        prompter(image=reference, prompt="a shape", start=start, end=end, num_inference_steps=4, output_type="np",
                 generator=torch.Generator("cpu").manual_seed(0))
        assert [i for i, n in enumerate(lengths) if n > min(lengths)] == acting
    spy.remove()
    prompter.detach()


@pytest.mark.parametrize("order", ["attach, then compile", "compile, then attach"])
def test_a_compiled_unet_gives_the_same_pixels_and_reuses_its_graphs(compact_folders, order):
    """pipe.unet = torch.compile(pipe.unet), before or after the adapter is attached: the same images as eager, from
    one graph for all the steps of a generation (no step recompiles) that a second generation with the same settings
    reuses; a step window adds two graphs (steps inside it, steps outside), not one per step."""
    ours, adapter, encoder = _perturbed_base_adapter(compact_folders)
    reference = Image.new("RGB", (28, 28), "red")
    graphs = []

    def backend(graph, example_inputs):  # counts what dynamo captures and runs it as traced
        graphs.append(graph)
        return graph.forward

    def run(**kw):
        return prompter(image=reference, prompt="a shape", num_inference_steps=4, output_type="np", scale=0.7,
                        generator=torch.Generator("cpu").manual_seed(2), **kw).images  # fmt: skip

    torch._dynamo.reset()
    try:
        if order == "compile, then attach":
            eager = ImagePrompter(ours, adapter, encoder)
            expected, expected_window = eager(image=reference, prompt="a shape", num_inference_steps=4, output_type="np",
                                              scale=0.7, generator=torch.Generator("cpu").manual_seed(2)).images, None
            eager.detach()
            ours.unet = torch.compile(ours.unet, backend=backend)
            prompter = ImagePrompter(ours, adapter, encoder)
        else:
            prompter = ImagePrompter(ours, adapter, encoder)
            expected, expected_window = run(), run(start=0.5)
            ours.unet = torch.compile(ours.unet, backend=backend)
        first = run()
        assert len(graphs) == 1
        again = run()
        assert len(graphs) == 1  # nothing recompiled for the same settings
        assert abs(first - expected).max() <= 1e-6 and abs(again - expected).max() <= 1e-6
        if expected_window is not None:
            assert abs(run(start=0.5) - expected_window).max() <= 1e-6
            assert len(graphs) == 3
        prompter.detach()
    finally:
        torch._dynamo.reset()


def test_a_step_window_counts_every_unet_call_of_a_second_order_scheduler(folders):
    """Heun's schedule holds each inner timestep twice (t0, t1, t1, t2, t2, ...): each UNet call gets its own index
    i of N = len(timesteps) (the official rule's loop index), not the first occurrence of its timestep."""
    from diffusers import HeunDiscreteScheduler

    ours, adapter, encoder = _perturbed_base_adapter(folders)
    ours.scheduler = HeunDiscreteScheduler.from_config(ours.scheduler.config)
    prompter = ImagePrompter(ours, adapter, encoder)
    seen = []
    spy = ours.unet.register_forward_hook(lambda m, args, out: seen.append(adapter.state.progress))
    prompter(image=Image.new("RGB", (28, 28), "red"), prompt="a shape", start=0.25, end=0.75, num_inference_steps=4,
             output_type="np", generator=torch.Generator("cpu").manual_seed(0))
    spy.remove()
    prompter.detach()
    assert seen == [(i, 7) for i in range(7)]


def test_a_prompter_whose_adapter_no_longer_acts_on_the_pipeline_says_so(folders):
    """Diffusers calls that install their own processors, a detach, a replaced pipe.unet or a second prompter's idle
    adapter would otherwise give plain images (or a misleading error) without a word; a prompter that fails to attach
    its second adapter leaves the UNet as it was."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    ours, adapter, encoder = _perturbed_base_adapter(folders)
    reference = Image.new("RGB", (28, 28), "red")
    common = {"prompt": "a shape", "num_inference_steps": 2, "output_type": "np"}

    def run(p, **kw):
        return p(image=reference, generator=torch.Generator("cpu").manual_seed(2), **common, **kw).images

    prompter = ImagePrompter(ours, adapter, encoder)
    expected = run(prompter)
    ours.unet.set_attn_processor(AttnProcessor2_0())  # what enable_attention_slicing(), fuse_qkv_projections() do
    with pytest.raises(ValueError, match=r"attention processor of .*attn2 was replaced after this adapter was "
                                         r"attached \(it is now AttnProcessor2_0"):  # fmt: skip
        run(prompter)
    prompter.detach()
    with pytest.raises(ValueError, match=r"this adapter is not attached"):
        run(prompter)
    prompter = ImagePrompter(ours, adapter, encoder)
    assert abs(run(prompter) - expected).max() <= 1e-6  # attached again: the image prompt is back

    # a second prompter with its own adapter on the same pipeline: the first names it instead of "no image prompt"
    torch.manual_seed(1)
    other = IPAdapter.for_unet(ours.unet, "base", image_embed_dim=encoder.pooled_dim)
    second = ImagePrompter(ours, other, encoder)
    with pytest.raises(ValueError, match=r"another adapter \(base\) is attached to this pipeline's UNet with no "
                                         r"image prompt for this call"):  # fmt: skip
        run(prompter)
    second.detach()
    assert abs(run(prompter) - expected).max() <= 1e-6

    # an adapter that does not fit: the one before it is not left attached
    prompter.detach()
    misfit = IPAdapter(dataclasses.replace(adapter.config, cross_attention_dim=96))
    with pytest.raises(ValueError, match=r"the adapter expects|this adapter is for"):
        ImagePrompter(ours, [adapter, misfit], encoder)
    assert not adapter.attached

    prompter = ImagePrompter(ours, adapter, encoder)
    unet = ours.unet
    ours.unet = copy.deepcopy(unet)
    with pytest.raises(ValueError, match=r"attached to another UNet than this pipeline's"):
        run(prompter)
    ours.unet = unet
    assert abs(run(prompter) - expected).max() <= 1e-6
    prompter.detach()
    ours.enable_attention_slicing()  # before attaching: bypassed where the image prompt acts, which is said
    with pytest.warns(UserWarning, match=r"cross-attention layers use SlicedAttnProcessor; .*\(e.g. slicing\)"):
        prompter = ImagePrompter(ours, adapter, encoder)
    assert abs(run(prompter) - expected).max() <= 1e-5
    prompter.detach()


def test_call_arguments_that_would_be_ignored_are_refused_and_prompt_embeds_need_no_prompt(folders):
    ours, adapter, encoder = _perturbed_base_adapter(folders)
    reference = Image.new("RGB", (28, 28), "red")
    prompter = ImagePrompter(ours, adapter, encoder)
    common = {"num_inference_steps": 2, "output_type": "np"}
    for given in ({"scale": 0.0}, {"start": 0.5}, {"end": 0.5}):
        with pytest.raises(ValueError, match=rf"found both \(prompts and {next(iter(given))}\)"):
            prompter(prompts=[ImagePrompt(image=reference)], **given, **common)
    embeds, negative = ours.encode_prompt("a shape", "cpu", 1, True)
    by_text = prompter(image=reference, prompt="a shape", generator=torch.Generator("cpu").manual_seed(2), **common)
    by_embeds = prompter(image=reference, prompt_embeds=embeds, negative_prompt_embeds=negative,
                         generator=torch.Generator("cpu").manual_seed(2), **common)  # fmt: skip
    assert abs(by_text.images - by_embeds.images).max() <= 1e-6


def test_low_level_windows_need_the_step_and_offloaded_or_moved_unets_keep_the_adapter(folders):
    """A window on an adapter driven by hand (no ImagePrompter tracking the step) is refused until the step is set;
    attaching to a UNet whose weights accelerate offloads (on `meta` between calls) keeps the adapter's weights."""
    from accelerate import cpu_offload

    ours, adapter, encoder = _perturbed_base_adapter(folders)
    reference = Image.new("RGB", (28, 28), "red")
    common = {"prompt": "a shape", "num_inference_steps": 2, "output_type": "np"}
    adapter.attach(ours.unet)
    tokens = adapter.project(image=encoder.encode([reference], "pooled"))
    adapter.set_tokens(tokens, uncond=adapter.project(image=torch.zeros_like(encoder.encode([reference], "pooled"))))
    adapter.state.set_window(0.5, 1.0)
    with pytest.raises(ValueError, match=r"a step window \(0.5, 1.0\) is set but the denoising step is unknown"):
        ours(generator=torch.Generator("cpu").manual_seed(2), **common)
    adapter.state.progress = (0, 2)  # set by hand (and left at step 0 of 2, outside the window): no adapter
    outside = ours(generator=torch.Generator("cpu").manual_seed(2), **common).images
    adapter.detach()
    assert (outside == ours(generator=torch.Generator("cpu").manual_seed(2), **common).images).all()
    expected = ImagePrompter(ours, adapter, encoder)(image=reference, generator=torch.Generator("cpu").manual_seed(2),
                                                     **common).images  # fmt: skip
    adapter.detach()
    weights = {k: v.clone() for k, v in adapter.state_dict().items()}
    cpu_offload(ours.unet, execution_device=torch.device("cpu"))
    assert next(ours.unet.parameters()).device.type == "meta"
    found = ImagePrompter(ours, adapter, encoder)(image=reference, generator=torch.Generator("cpu").manual_seed(2),
                                                  **common).images  # fmt: skip
    assert all(torch.equal(v, adapter.state_dict()[k]) for k, v in weights.items())
    assert abs(found - expected).max() <= 1e-6


def test_two_threads_on_one_pipeline_take_turns_and_keep_their_references(folders):
    """A web app serving two users from one pipeline: generations on one UNet take turns (the image prompt lives in
    the adapter's state; without the lock one thread got the other's reference, the other an error)."""
    import threading

    ours, adapter, encoder = _perturbed_base_adapter(folders)
    prompter = ImagePrompter(ours, adapter, encoder)
    references = [Image.new("RGB", (28, 28), "red"), Image.new("RGB", (28, 28), "blue")]
    kwargs = [{}, {"start": 0.5}]  # the second also sets a window (step tracking) while the first runs

    def generate(i):
        return prompter(image=references[i], prompt="a shape", num_inference_steps=6, output_type="np",
                        generator=torch.Generator("cpu").manual_seed(5), **kwargs[i]).images  # fmt: skip

    expected = [generate(0), generate(1)]
    assert abs(expected[0] - expected[1]).max() > 1e-3  # the references make a difference
    for _ in range(2):
        found, errors = {}, []

        def work(i):
            try:
                found[i] = generate(i)
            except Exception as error:  # noqa: BLE001 (reported below)
                errors.append(error)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and all((found[i] == expected[i]).all() for i in range(2))
    prompter.detach()
