-- delete (post): remove a post of its author, queue its comments and likes for clean-up, drop its counts and write
-- its outbox row, one statement. Every transaction deletes a post nobody deleted before: client c takes rows
-- start + c * slice + 0, 1, ... of bench.py's pool (-D base, -D start, -D slice).
\set n :n + 1
\set id :base + :start + :client_id * :slice + :n - 1
WITH gone AS (DELETE FROM pgb_post_info WHERE id = :id AND author = 'bench_author' RETURNING id),
     queued AS (INSERT INTO pgb_cleanup_queue (kind, target_id) SELECT 'post', id FROM gone),
     slots AS (DELETE FROM pgb_counter_slots WHERE kind IN ('post', 'comments') AND target_id IN (SELECT id FROM gone)),
     bases AS (DELETE FROM pgb_like_counts WHERE kind IN ('post', 'comments') AND target_id IN (SELECT id FROM gone))
INSERT INTO pgb_events (type, post_id, data, next_attempt_at)
SELECT 'post.deleted', id, jsonb_build_object('post_id', id, 'user_id', 'bench_author'), NULL FROM gone;
