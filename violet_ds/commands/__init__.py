"""Top floor: the commands (pretrain / finetune / evaluate / bench ...). They build config -> model -> task ->
data -> engine and hand the resolved config down; `engine/` below them knows no task, target or CLI."""
