-- comment delete: remove a comment of its user with its sub-comments (the thread of a root comment), queue their
-- likes for clean-up, drop their like and reply counts, take them off the post's comment count (and the root's
-- reply count for a reply), write the outbox row: one statement. Every transaction deletes a comment nobody
-- deleted before: client c takes rows start + c * slice + 0, 1, ... of bench.py's pool (root comments without
-- replies; -D base, -D start, -D slice). The rows go by `id = ANY (ARRAY(...))`: `id IN (SELECT id FROM doomed)`
-- is planned as a hash join over a sequential scan of the whole comment table (the recursive CTE's row estimate).
\set n :n + 1
\set id :base + :start + :client_id * :slice + :n - 1
\set slot random(0, 63)
WITH RECURSIVE doomed AS (
    SELECT id, root_id FROM pgb_post_comment_info WHERE id = :id AND user_id = 'bench_user'
    UNION
    SELECT c.id, c.root_id FROM pgb_post_comment_info c JOIN doomed d
      ON (d.root_id = 0 AND c.root_id = d.id) OR (d.root_id <> 0 AND c.father_id = d.id AND c.root_id = d.root_id)),
gone AS (DELETE FROM pgb_post_comment_info WHERE id = ANY (ARRAY(SELECT id FROM doomed)) RETURNING id, root_id, post_id),
queued AS (INSERT INTO pgb_cleanup_queue (kind, target_id) SELECT 'comment', id FROM gone),
slots AS (DELETE FROM pgb_counter_slots WHERE kind IN ('comment', 'children') AND target_id IN (SELECT id FROM gone)),
bases AS (DELETE FROM pgb_like_counts WHERE kind IN ('comment', 'children') AND target_id IN (SELECT id FROM gone)),
bump AS (INSERT INTO pgb_counter_slots AS s (kind, target_id, slot, n)
         SELECT 'comments', post_id, :slot::smallint, -count(*) FROM gone GROUP BY post_id
         UNION ALL
         SELECT 'children', root_id, :slot::smallint, -count(*) FROM gone
         WHERE root_id <> 0 AND root_id NOT IN (SELECT id FROM gone) GROUP BY root_id
         ON CONFLICT (kind, target_id, slot) DO UPDATE SET n = s.n + EXCLUDED.n)
INSERT INTO pgb_events (type, post_id, data, next_attempt_at)
SELECT 'comment.deleted', post_id,
       jsonb_build_object('comment_id', id, 'post_id', post_id, 'user_id', 'bench_user',
                          'deleted_ids', (SELECT jsonb_agg(id) FROM gone)),
       NULL
FROM gone WHERE id = :id;
