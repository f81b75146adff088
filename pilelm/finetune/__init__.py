"""Fine-tuning a pretrained run on a task: classify, ner, punct (see ``tasks.TASKS``)."""
