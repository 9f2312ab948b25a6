"""Video and frame sequences through `o2f predict`: one record and one output frame per input
frame, streamed; unreadable videos and bad frames stop with a one-line error naming the file
and the frame, after the frames before it are saved."""

import json

import numpy as np
import pytest
import torch

import o2f
from o2f.cli import main
from o2f.config import load_config
from o2f.predict import predict_video
from o2f.video import FrameError, read_video

av = pytest.importorskip("av")


def write_video(path, n, size=(48, 64), codec="libx264", rate=5):
    """n frames of noise (each frame's mean brightness rises with its index)."""
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.height, stream.width = size
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        for i in range(n):
            a = (rng.random((*size, 3)) * 60 + 3 * i).astype(np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")))
        container.mux(stream.encode(None))
    return path


def count_video_frames(path):
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def error_lines(capsys):
    """The lines of stderr other than progress bars."""
    return [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines()
            if line.strip() and "frame/s" not in line and "%|" not in line]


def one_box(images):
    """A stand-in detector: one box at the top left of every frame, scored 0.9."""
    return [{"boxes": torch.tensor([[2.0, 2.0, 20.0, 16.0]]), "scores": torch.tensor([0.9]),
             "labels": torch.tensor([0])} for _ in images]


@pytest.fixture
def checkpoint(tmp_path):
    cfg = load_config("digits", ["model.num_classes=1"])
    model = o2f.build_model(cfg.model)
    path = tmp_path / "untrained.pt"
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(),
                "class_names": ["digit"]}, path)
    return path


def test_video_of_n_frames_gives_n_records_and_n_frames(tmp_path, checkpoint):
    video = write_video(tmp_path / "clip.mp4", 7)
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(checkpoint), str(video), "--out", str(out),
                 "--batch-size", "3", "--score-thresh", "0"]) == 0
    records = [json.loads(line) for line in (out / "clip.jsonl").read_text().splitlines()]
    assert [r["frame"] for r in records] == list(range(7))
    assert records[1]["time"] == pytest.approx(0.2)
    assert count_video_frames(out / "clip.mp4") == 7
    with av.open(str(out / "clip.mp4")) as container:
        s = container.streams.video[0]
        assert (s.height, s.width) == (48, 64) and s.average_rate == 5


def test_video_frames_are_batched_and_drawn(tmp_path):
    video = write_video(tmp_path / "clip.mp4", 5)
    batches = []

    def detector(images):
        batches.append(len(images))
        return one_box(images)

    summary = predict_video(video, tmp_path / "out", model=detector, class_names=["thing"],
                            batch_size=2)
    assert batches == [2, 2, 1] and summary["frames"] == 5 and summary["fps"] > 0
    records = [json.loads(line) for line in (tmp_path / "out/clip.jsonl").read_text().splitlines()]
    assert all(r["detections"] == [{"box": [2.0, 2.0, 20.0, 16.0], "score": 0.9, "label": 0,
                                    "class": "thing"}] for r in records)
    # the box is drawn: the output's top-left differs from the input's, the rest does not
    src = [f.image for f in read_video(video)]
    dst = [f.image for f in read_video(tmp_path / "out/clip.mp4")]
    edge = (dst[0][:, 2, 4:18].float() - src[0][:, 2, 4:18].float()).abs().mean()
    inside = (dst[0][:, 30:, 30:].float() - src[0][:, 30:, 30:].float()).abs().mean()
    assert edge > 3 * inside


def test_unreadable_video_gives_one_line_error(tmp_path, checkpoint, capsys):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x01not a video" * 50)
    code = main(["predict", "--checkpoint", str(checkpoint), str(bad),
                 "--out", str(tmp_path / "out")])
    err = error_lines(capsys)
    assert code == 2
    assert len(err) == 1 and str(bad) in err[0] and "cannot open video" in err[0]


def test_bad_video_frame_keeps_the_frames_before(tmp_path):
    video = write_video(tmp_path / "clip.avi", 6, codec="mjpeg")
    data = bytearray(video.read_bytes())
    starts = [i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xD8]
    assert len(starts) == 6  # one JPEG per frame
    data[starts[3]:starts[4] - 16] = b"\x11" * (starts[4] - 16 - starts[3])  # frame 3
    video.write_bytes(bytes(data))
    with pytest.raises(FrameError) as info:
        predict_video(video, tmp_path / "out", model=one_box, class_names=["x"], batch_size=2)
    message = str(info.value)
    assert "\n" not in message and str(video) in message and "frame 3" in message
    lines = (tmp_path / "out/clip.jsonl").read_text().splitlines()
    assert [json.loads(line)["frame"] for line in lines] == [0, 1, 2]
    assert count_video_frames(tmp_path / "out/clip.mp4") == 3


def test_bad_frame_in_a_folder_of_frames(tmp_path, checkpoint, capsys):
    frames = tmp_path / "frames"
    frames.mkdir()
    rng = np.random.default_rng(0)
    from PIL import Image

    for i in range(5):
        Image.fromarray((rng.random((40, 56, 3)) * 255).astype(np.uint8)).save(
            frames / f"f{i:03d}.png")
    (frames / "f002.png").write_bytes(b"truncated")
    out = tmp_path / "out"
    code = main(["predict", "--checkpoint", str(checkpoint), str(frames / "f*.png"),
                 "--out", str(out), "--batch-size", "4"])
    err = error_lines(capsys)
    assert code == 2 and len(err) == 1
    assert str(frames / "f002.png") in err[0] and "frame 2" in err[0]
    kept = [json.loads(line)["file"] for line in (out / "detections.jsonl").read_text()
            .splitlines()]
    assert kept == [str(frames / "f000.png"), str(frames / "f001.png")]
    assert len(json.loads((out / "detections.json").read_text())) == 2
    assert sorted(p.name for p in out.glob("*.png")) == ["f000.png", "f001.png"]
