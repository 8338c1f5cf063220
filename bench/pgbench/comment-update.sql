-- comment update: change a comment of its user and write the outbox row, one statement (the owner check is the
-- WHERE clause). Comments: the pool of bench.py (-D base, -D size), root comments of bench_user, picked at random.
\set i random(0, :size - 1)
\set id :base + :i
WITH updated AS (
    UPDATE pgb_post_comment_info
    SET content = 'eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee', updated_at = now()
    WHERE id = :id AND user_id = 'bench_user'
    RETURNING id, post_id)
INSERT INTO pgb_events (type, post_id, data, next_attempt_at)
SELECT 'comment.updated', post_id,
       jsonb_build_object('comment_id', id, 'post_id', post_id, 'user_id', 'bench_user',
                          'content', 'eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee'),
       NULL
FROM updated;
