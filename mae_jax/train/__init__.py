"""Training: one loop (`loop`) for every task (`pretrain`, `classify`).

A task (`task.Task`) says what is trained: the model, the optimizer, the
sharded initial state, the loss of a micro-batch, and its evaluation and
figures. The loop (`loop.run`) does everything else the same way for every
task: the workdir lock, preemption, checkpoints (saved asynchronously, with
per-leaf checksums verified on restore), resume checks against the saved
config, log / checkpoint / eval / figure cadences, the non-finite policy and
progress. Supporting modules: `optim`, `sharding`, `monitor`, `workdir`,
`checkpoints`, `mixup`.
"""
