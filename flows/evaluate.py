"""Flow of the evaluate stage: 10-crop and centre-crop error on the validation store,
a per-class report, every image's prediction and the plots' data (the worst classes),
section 6.1's figures (conv1's kernels,
a top-5 gallery, nearest neighbours in the last hidden layer) and Prefect artifacts."""

from __future__ import annotations

from pathlib import Path

import torch
from prefect import flow, get_run_logger
from prefect.artifacts import create_image_artifact, create_markdown_artifact
from rich.progress import Progress

from alexnet.eval_files import data_url, markdown_summary, write_evaluation
from alexnet.evaluate import Results, load_model_for, refuse, sample, speed_switches, top5_table
from alexnet.evaluate import evaluate as evaluate_split
from alexnet.figures import FIGURES, kernels_figure, neighbours_figure, png, top5_figure
from alexnet.jpeg import decode_threads
from alexnet.lmdb_store import StoreError
from alexnet.neighbours import images_of, nearest, query_vectors, table
from alexnet.params import ComputeParams, EvaluateParams, JpegDecoder
from alexnet.placement import resolve_devices
from alexnet.reader import LmdbSplit, check_together


def _figures(
    model: torch.nn.Module,
    mean: torch.Tensor,
    val: LmdbSplit,
    train: LmdbSplit,
    results: Results,
    chosen: list[int],
    evaluate: EvaluateParams,
    device: torch.device,
    decoder: JpegDecoder,
    progress: Progress,
) -> tuple[dict[str, bytes], dict[str, list[dict]]]:
    """The three PNGs, and the tables of the gallery and of the neighbours."""
    names = [entry["name"] for entry in val.classes]
    gallery = chosen[: evaluate.gallery]
    images, labels = val.read_batch(gallery)
    pictures = {
        "kernels": kernels_figure(model.layers()["conv1"].weight, model.columns),
        "top5": top5_figure(images, labels.tolist(), results.kept, names),
    }
    tables = {"top5": top5_table(gallery, labels.tolist(), results.kept, names)}
    queries = chosen[: evaluate.queries]
    images, labels = val.read_batch(queries)
    vectors = query_vectors(model, val, queries, mean, model.input_size, device, decoder)
    bar = progress.add_task("nearest neighbours (train store)", total=len(train))
    found = nearest(
        model,
        vectors,
        train,
        mean,
        model.input_size,
        evaluate.neighbours,
        evaluate.neighbour_batch,
        device,
        on_batch=lambda n: progress.advance(bar, n),
        workers=evaluate.loader_workers,
        decoder=decoder,
    )
    pictures["neighbours"] = neighbours_figure(
        images,
        labels.tolist(),
        images_of(train, found),
        found.labels,
        found.distances,
        names,
        dimensions=vectors.shape[1],
    )
    tables["neighbours"] = table(queries, labels.tolist(), found, names)
    return {name: png(figure) for name, figure in pictures.items()}, tables


@flow(name="evaluate")
def evaluate_flow(
    val: str,
    model_path: str,
    train: str,
    metrics: str,
    evaluate: EvaluateParams,
    compute: ComputeParams,
) -> dict:
    """Write metrics/eval.json and, in metrics/eval/, per_class.csv, confusion.csv, the
    plots' worst_classes.csv and worst_confusion.csv, kernels.png, top5.png and top5.csv,
    neighbours.png and neighbours.csv. The mean
    image is the model file's: the one its training subtracted."""
    logger = get_run_logger()
    refuse(val, model_path, train, metrics, evaluate)
    device = resolve_devices([evaluate.device])[0]
    threads = decode_threads(evaluate.loader_workers)  # per loader process
    split = LmdbSplit(val, threads)
    model, payload = load_model_for(split, Path(model_path), device, compute.kernels)
    training = LmdbSplit(train, threads)
    check_together(training, split)
    if not len(training):  # before the evaluation (hours), not at its end
        raise StoreError(f"{train}: no images to search for section 6.1's neighbours")
    mean = payload["mean"].float()
    chosen = sample(len(split), max(evaluate.gallery, evaluate.queries), evaluate.seed)
    switches = speed_switches(model, device, evaluate.amp, evaluate.channels_last)
    with Progress() as progress, switches:
        bar = progress.add_task("evaluate (10 crops)", total=len(split))
        results = evaluate_split(
            model,
            split,
            mean,
            model.input_size,
            evaluate.batch_size,
            device,
            on_batch=lambda n: progress.advance(bar, n),
            keep=chosen[: evaluate.gallery],
            workers=evaluate.loader_workers,
            decoder=compute.jpeg_decoder,
        )
        figures, tables = _figures(
            model,
            mean,
            split,
            training,
            results,
            chosen,
            evaluate,
            device,
            compute.jpeg_decoder,
            progress,
        )
    summary = results.summary()
    per_class = results.per_class(split.classes)
    confusion = results.confusion(split.classes)
    tables |= results.plotted(split.classes, per_class, evaluate.plot_classes)
    write_evaluation(Path(metrics), summary, per_class, confusion, figures, tables)
    logger.info(
        "10-crop top-1 error %.4f, top-5 %.4f; centre crop %.4f / %.4f; %d images",
        summary["top1_error"],
        summary["top5_error"],
        summary["center_top1_error"],
        summary["center_top5_error"],
        summary["images"],
    )
    create_markdown_artifact(
        markdown_summary(summary, per_class), key="evaluation", description="10-crop evaluation"
    )
    for name, data in figures.items():  # the UI shows an image artifact from a data URL
        create_image_artifact(data_url(data), key=f"evaluation-{name}", description=FIGURES[name])
    return summary


if __name__ == "__main__":
    from flows.stages import main

    main("evaluate", evaluate_flow)
