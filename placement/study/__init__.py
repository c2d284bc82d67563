"""Stage `study`: the user's questions, one function each: where (profile), which placement wins (compare), does
it depend on the task (stability)."""
