"""The ImageNet-512 path on the CPU, at toy size: a generated folder of 20 images in 3 classes and a
tiny randomly initialized diffusers AutoencoderKL (no download) -> scaled.encode -> shards ->
LatentDataset -> teacher steps with label dropout and sCD steps of the guided teacher on unet-tiny
-> scaled.sample -> decoded PNGs and the .npz batch; resuming after a crash; bad input."""

import json
import os
import pickle

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import save_file

import scm_min
from scaled import encode, sample
from scaled.latents import LATENT_MEAN, LATENT_STD, LatentDataset, denormalize, normalize, shard_paths
from scaled.networks import freeze, make_net
from scaled.step import (ConditionedLoss, TrainStep, classifier_free_guidance, drop_labels, sample_guidance,
                         scm_loss, teacher_loss)
from scm_min import SIGMA_D, InputError

CLASSES = ["n01440764", "n01443537", "n01484850"]
RESOLUTION, LATENT = 64, 8   # the tiny VAE downsamples by 8, as the SD-VAE: 8x8x4 latents for unet-tiny


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                        sample_size=RESOLUTION)
    folder = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(folder)
    return str(folder)


def make_images(folder, per_class=(7, 7, 6), seed=0):
    """20 images in 3 class folders, of varied sizes and aspect ratios, JPEG and PNG."""
    rng = np.random.default_rng(seed)
    for name, count in zip(CLASSES, per_class):
        os.makedirs(folder / name)
        for i in range(count):
            h, w = rng.integers(RESOLUTION, 3 * RESOLUTION, 2)
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            PIL.Image.fromarray(pixels).save(folder / name / f"{name}_{i}.{'JPEG' if i % 2 else 'png'}")
    return folder


def encode_args(source, out, vae, *extra):
    return ["--source", str(source), "--out", str(out), "--vae", vae, "--resolution", str(RESOLUTION),
            "--shard-size", "8", "--batch-size", "3", "--workers", "0", *extra]


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, vae_folder):
    root = tmp_path_factory.mktemp("imagenet")
    source = make_images(root / "train")
    assert encode.main(encode_args(source, root / "latents", vae_folder)) == 0
    return source, root / "latents"


def test_center_crop_is_square_and_centered():
    pixels = np.zeros((300, 500, 3), dtype=np.uint8)
    pixels[:, 200:300] = 255   # a centered white stripe of a fifth of the width
    out = encode.center_crop_dhariwal(PIL.Image.fromarray(pixels), 64)
    assert out.shape == (64, 64, 3)
    column_means = out[..., 0].mean(axis=0)
    assert column_means[32] > 250 and column_means[2] < 5 and column_means[-3] < 5   # stripe stays centered


def test_encoding_writes_shards_labels_and_manifest(encoded):
    source, latents = encoded
    manifest = json.loads((latents / "manifest.json").read_text())
    assert manifest["classes"] == CLASSES and manifest["num_images"] == 20 and manifest["num_shards"] == 3
    assert (latents / "classes.txt").read_text().split() == CLASSES
    files, labels = [], []
    for index in range(3):
        npy, record = shard_paths(str(latents), index)
        record = json.loads(open(record).read())
        assert np.load(npy).shape == (record["count"], 8, LATENT, LATENT)
        files += record["files"]
        labels += record["labels"]
    assert labels == [CLASSES.index(os.path.dirname(f)) for f in files] and len(files) == 20
    assert sorted(files) == sorted(os.path.relpath(os.path.join(r, f), source)
                                   for r, _, fs in os.walk(source) for f in fs)


def test_dataset_draws_from_the_posterior_and_normalizes(encoded):
    _, latents = encoded
    data = LatentDataset(str(latents))
    assert (len(data), data.shape, data.num_classes) == (20, (4, LATENT, LATENT), 3)
    indices = torch.tensor([0, 19, 7, 8, 7])   # across shards, repeated
    x, labels = data.batch(indices, torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32 and x.shape == (5, 4, LATENT, LATENT) and labels.dtype == torch.int64
    assert labels.tolist() == [0, 2, 1, 1, 1]   # 7, 7 and 6 images a class
    raw = data.raw(indices.numpy())
    noise = torch.randn(5, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(0))
    expected = (raw[:, :4] + raw[:, 4:] * noise - torch.tensor(LATENT_MEAN)[:, None, None]) \
        / torch.tensor(LATENT_STD)[:, None, None] * SIGMA_D
    torch.testing.assert_close(x, expected)
    torch.testing.assert_close(denormalize(normalize(raw[:, :4])), raw[:, :4])
    assert not torch.equal(x, data.batch(indices, torch.Generator().manual_seed(1))[0])   # a fresh draw
    copy = pickle.loads(pickle.dumps(data))   # as a worker process receives it: paths, no mapped arrays
    assert len(pickle.dumps(data)) < 20000
    torch.testing.assert_close(copy.batch(indices, torch.Generator().manual_seed(0))[0], x)
    # With the measured moments, draws over the whole set have per-channel mean 0 and std SIGMA_D.
    measured = LatentDataset(str(latents), normalization="measured")
    draws = torch.cat([measured.batch(torch.arange(20), torch.Generator().manual_seed(s))[0] for s in range(20)])
    torch.testing.assert_close(draws.mean(dim=(0, 2, 3)), torch.zeros(4), atol=0.02, rtol=0)
    torch.testing.assert_close(draws.std(dim=(0, 2, 3)), torch.full((4,), SIGMA_D), atol=0.02, rtol=0)


def test_teacher_and_guided_scd_steps_then_samples_decode_to_pngs(encoded, vae_folder, tmp_path, capsys):
    _, latents = encoded
    data = LatentDataset(str(latents))
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    teacher = make_net("unet-tiny", dtype=torch.float32)
    step = TrainStep(teacher, teacher_loss(teacher, label_dropout=0.1), lr=1e-3)
    for iteration in range(2):
        x0, labels = data.batch(torch.randint(0, len(data), (8,), generator=generator), generator)
        loss, _ = step(x0, iteration, class_labels=labels)
        assert torch.isfinite(loss)
    student = make_net("unet-tiny", dtype=torch.float32, guidance_embedding=True)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and all("guidance" in k for k in missing)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    guided_teacher = classifier_free_guidance(freeze(teacher, torch.float32))
    step = TrainStep(student, scm_loss(student, guided_teacher, warmup_steps=1, guidance_range=(1, 2)), lr=1e-3)
    for iteration in range(2):
        x0, labels = data.batch(torch.randint(0, len(data), (8,), generator=generator), generator)
        loss, logs = step(x0, iteration, class_labels=labels)
        assert torch.isfinite(loss) and logs["g_norm"] > 0
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())

    # As scaled.train exports EMA weights: safetensors whose metadata names the preset and its arguments.
    save_file(student.state_dict(), str(tmp_path / "student.safetensors"),
              metadata=dict(net="unet-tiny", net_kwargs=json.dumps(dict(guidance_embedding=True))))
    out = tmp_path / "samples"
    args = ["--weights", str(tmp_path / "student.safetensors"), "--out", str(out),
            "--vae", vae_folder, "--n", "5", "--batch-size", "2", "--classes", "0,2", "--npz"]
    assert sample.main(args + ["--sampler", "2"]) == 0
    pngs = sorted(os.listdir(out / "images"))
    assert pngs == [f"{i:06d}.png" for i in range(5)]
    images = [np.asarray(PIL.Image.open(out / "images" / p)) for p in pngs]
    assert all(image.shape == (RESOLUTION, RESOLUTION, 3) and image.dtype == np.uint8 for image in images)
    with np.load(out / "samples.npz") as batch:
        np.testing.assert_array_equal(batch["arr_0"], np.stack(images))
        assert batch["arr_1"].tolist() == [0, 2, 0, 2, 0]
    # A second run finds every image and samples nothing; the 1-step and teacher samplers also run.
    mtime = os.path.getmtime(out / "images" / pngs[0])
    assert sample.main(args + ["--sampler", "2"]) == 0 and os.path.getmtime(out / "images" / pngs[0]) == mtime
    capsys.readouterr()
    assert sample.main(args + ["--sampler", "2", "--seed", "1"]) == 2   # other settings into the same folder
    assert "holds samples made with other seed" in one_error_line(capsys)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    for sampler, weights in (("1", "student.safetensors"), ("teacher", "teacher.pt")):
        run = tmp_path / sampler
        assert sample.main(["--preset", "unet-tiny", "--weights", str(tmp_path / weights), "--out", str(run),
                            "--vae", vae_folder, "--n", "2", "--sampler", sampler, "--teacher-steps", "2"]) == 0
        assert len(os.listdir(run / "images")) == 2


def test_encode_resumes_after_a_crash_and_skips_done_shards(tmp_path, vae_folder, monkeypatch, capsys):
    source = make_images(tmp_path / "train")
    reference = tmp_path / "reference"
    assert encode.main(encode_args(source, reference, vae_folder)) == 0
    out = tmp_path / "latents"
    real_encode_batch, calls, crash_at = encode.encode_batch, [], [5]

    def crashing(*args):   # the 5th batch dies: during shard 1 (batches of 3 in shards of 8)
        calls.append(1)
        if len(calls) == crash_at[0]:
            raise KeyboardInterrupt
        return real_encode_batch(*args)

    monkeypatch.setattr(encode, "encode_batch", crashing)
    with pytest.raises(KeyboardInterrupt):
        encode.main(encode_args(source, out, vae_folder))
    monkeypatch.setattr(encode, "encode_batch", real_encode_batch)
    assert os.path.exists(shard_paths(str(out), 0)[1]) and not os.path.exists(shard_paths(str(out), 1)[1])
    with pytest.raises(InputError, match="not fully encoded"):
        LatentDataset(str(out))
    # What a kill leaves: a half-written temporary, and a shard whose array was cut short.
    open(shard_paths(str(out), 1)[0] + ".tmp", "wb").write(b"\x93NUMPY partial")
    npy2, record2 = shard_paths(str(reference), 2)
    open(shard_paths(str(out), 2)[1], "w").write(open(record2).read())
    open(shard_paths(str(out), 2)[0], "wb").write(open(npy2, "rb").read()[:500])
    done_before = os.path.getmtime(shard_paths(str(out), 0)[0])
    calls.clear()
    crash_at[0] = 1   # a run that dies at once still removed the killed run's temporaries first
    monkeypatch.setattr(encode, "encode_batch", crashing)
    with pytest.raises(KeyboardInterrupt):
        encode.main(encode_args(source, out, vae_folder))
    monkeypatch.setattr(encode, "encode_batch", real_encode_batch)
    assert not os.path.exists(shard_paths(str(out), 1)[0] + ".tmp")
    capsys.readouterr()
    assert encode.main(encode_args(source, out, vae_folder)) == 0
    err = capsys.readouterr().err
    assert "2 to encode, 1 already done" in err and "shard 2 is incomplete or corrupt" in err
    assert os.path.getmtime(shard_paths(str(out), 0)[0]) == done_before   # done shards untouched
    assert not any(name.endswith(".tmp") for name in os.listdir(out))
    for index in range(3):
        np.testing.assert_array_equal(np.load(shard_paths(str(out), index)[0]),
                                      np.load(shard_paths(str(reference), index)[0]))
    assert len(LatentDataset(str(out))) == 20


def one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ")
    return err[-1]


def test_bad_input_gives_one_line_and_keeps_finished_work(tmp_path, vae_folder, encoded, capsys):
    source = make_images(tmp_path / "train")
    broken = source / CLASSES[2] / f"{CLASSES[2]}_3.JPEG"   # in the last shard
    broken.write_bytes(b"not a jpeg at all")
    out = tmp_path / "latents"
    assert encode.main(encode_args(source, out, vae_folder)) == 2
    line = one_error_line(capsys)
    assert "cannot read image" in line and str(broken) in line
    assert os.path.exists(shard_paths(str(out), 0)[1]) and os.path.exists(shard_paths(str(out), 1)[1])
    assert not os.path.exists(shard_paths(str(out), 2)[1])
    # Another setting into the same folder is refused before anything is written.
    manifest = (out / "manifest.json").read_text()
    assert encode.main(encode_args(source, out, vae_folder, "--dtype", "float16")) == 2
    assert "already holds an encoding with other dtype" in one_error_line(capsys)
    assert (out / "manifest.json").read_text() == manifest
    # No VAE weights and no internet: one line naming the model and how to fetch it.
    assert encode.main(encode_args(source, tmp_path / "other", "no-such-org/no-such-vae")) == 2
    line = one_error_line(capsys)
    assert "'no-such-org/no-such-vae'" in line and "hf download no-such-org/no-such-vae" in line
    assert encode.main(["--source", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in one_error_line(capsys)
    for folder, message in ((None, "no latent folder given"), (tmp_path / "missing", "holds no manifest.json")):
        with pytest.raises(InputError, match=message):
            LatentDataset(folder)
    # A corrupt shard: the dataset says which file, in one line.
    _, latents = encoded
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in os.listdir(latents):
        (copy / name).write_bytes((latents / name).read_bytes())
    npy = shard_paths(str(copy), 1)[0]
    open(npy, "r+b").truncate(1000)
    with pytest.raises(InputError, match="shard-00001.npy") as error:
        LatentDataset(str(copy))
    assert "\n" not in str(error.value)
    open(npy, "wb").write(b"garbage" * 100)
    with pytest.raises(InputError, match="corrupt"):
        LatentDataset(str(copy))
    # Weights that are no state_dict, or do not fit the preset.
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    torch.save(make_net("dit-tiny").state_dict(), tmp_path / "dit.pt")
    save_file(make_net("dit-tiny").state_dict(), str(tmp_path / "dit.safetensors"),
              metadata=dict(net="dit-tiny", net_kwargs="{}"))
    for weights, message in (("bad.pt", "cannot read weights"), ("dit.pt", "do not fit preset unet-tiny"),
                             ("none.pt", "does not exist"), ("dit.safetensors", "not --preset unet-tiny")):
        assert sample.main(["--preset", "unet-tiny", "--weights", str(tmp_path / weights), "--out",
                            str(tmp_path / "s"), "--vae", vae_folder, "--n", "1"]) == 2
        assert message in one_error_line(capsys)


def test_label_dropout_and_per_sample_guidance_reach_the_networks():
    labels = torch.arange(10000) % 7
    dropped = drop_labels(labels, 0.1, torch.Generator().manual_seed(0))
    kept = dropped >= 0
    assert abs((~kept).float().mean().item() - 0.1) < 0.01 and torch.equal(dropped[kept], labels[kept])
    assert set(dropped[~kept].tolist()) == {-1}
    w = sample_guidance(10000, 1, 2, torch.Generator().manual_seed(0))
    assert w.min() >= 1 and w.max() <= 2 and abs(w.mean().item() - 1.5) < 0.01

    seen = []

    def recording(name):
        def net(x, t, class_labels=None, guidance=None):
            seen.append((name, class_labels, guidance))
            return torch.zeros_like(x)
        net.logvar = scm_min.AdaptiveWeight()
        return net

    x0 = torch.randn(256, 4, 2, 2) * SIGMA_D
    student, teacher = recording("student"), recording("teacher")
    loss = teacher_loss(student, label_dropout=0.5)
    assert isinstance(loss, ConditionedLoss) and loss.P_mean == -0.4   # attributes of the wrapped loss
    loss(student, x0, 0, class_labels=torch.arange(256) % 5)
    (_, given, guidance), = seen
    assert guidance is None and 0.3 < (given == -1).float().mean() < 0.7
    seen.clear()
    scm_loss(student, teacher, guidance_range=(1, 2))(student, x0, 0, class_labels=torch.arange(256) % 5)
    guidances = [g for _, _, g in seen]
    assert [name for name, _, _ in seen] == ["teacher", "student", "student"]
    assert all(torch.equal(g, guidances[0]) for g in guidances) and 1 <= guidances[0].min() <= guidances[0].max() <= 2
    assert all(torch.equal(labels, torch.arange(256) % 5) for _, labels, _ in seen)   # sCD drops no labels


def test_processes_of_a_torchrun_encode_take_every_nth_shard(tmp_path, vae_folder, encoded, monkeypatch, capsys):
    source, reference = encoded
    out = tmp_path / "latents"
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, shards in (("1", [1]), ("0", [0, 1, 2])):
        monkeypatch.setenv("RANK", rank)
        assert encode.main(encode_args(source, out, vae_folder)) == 0
        assert [i for i in range(3) if os.path.exists(shard_paths(str(out), i)[1])] == shards
    assert "all shards done" in capsys.readouterr().err
    for index in range(3):
        np.testing.assert_array_equal(np.load(shard_paths(str(out), index)[0]),
                                      np.load(shard_paths(str(reference), index)[0]))


def test_sampling_processes_split_batches_and_match_one_process(tmp_path, vae_folder, monkeypatch, capsys):
    torch.manual_seed(0)
    torch.save(make_net("unet-tiny", dtype=torch.float32).state_dict(), tmp_path / "net.pt")
    args = lambda out: ["--preset", "unet-tiny", "--weights", str(tmp_path / "net.pt"), "--out", str(tmp_path / out),
                        "--vae", vae_folder, "--n", "5", "--batch-size", "2", "--sampler", "teacher",
                        "--teacher-steps", "2", "--npz"]
    assert sample.main(args("one")) == 0
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, images in (("1", [2, 3]), ("0", [0, 1, 2, 3, 4])):   # batches of 2: process 1 takes batch 1
        monkeypatch.setenv("RANK", rank)
        assert sample.main(args("two")) == 0
        assert sorted(os.listdir(tmp_path / "two" / "images")) == [f"{i:06d}.png" for i in images]
        assert os.path.exists(tmp_path / "two" / "samples.npz") == (rank == "0")   # the last one writes it
    with np.load(tmp_path / "one" / "samples.npz") as one, np.load(tmp_path / "two" / "samples.npz") as two:
        np.testing.assert_array_equal(one["arr_0"], two["arr_0"])
