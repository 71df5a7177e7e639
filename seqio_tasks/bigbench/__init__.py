"""BIG-bench JSON tasks as seqio tasks, read straight from `task.json` files.

`register_bigbench_tasks(path)` registers every task under the `bbseqio` naming scheme; see
`tasks.py`. `ensure_registered(name)` registers the task a name refers to from the folder
configured when it is called (gin included; `by_name.py`). `parent_aggregate(name, results)`
is BIG-bench's aggregate score of a task with subtasks (`aggregate.py`). The `bigbench`
package's own `api`/`bbseqio` are not used (they break on current `datasets` and need the
unreachable T5 vocabulary).
"""

from seqio_tasks.bigbench.aggregate import parent_aggregate
from seqio_tasks.bigbench.by_name import ensure_registered
from seqio_tasks.bigbench.tasks import register_bigbench_tasks

__all__ = ["ensure_registered", "parent_aggregate", "register_bigbench_tasks"]
