"""P5 prompt families as SeqIO tasks and mixtures.

``import tasks.tasks, tasks.mixtures`` registers every task and mixture (see
`tasks.tasks` for the naming scheme). `tasks.templates` holds the prompts as
data; `tasks.preprocessors` renders them from prepared data.
"""
