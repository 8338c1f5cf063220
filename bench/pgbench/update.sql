-- update (post): change a post of its author and write its outbox row, one statement. The owner check is the
-- WHERE clause: nothing is written for someone else's post. Posts: the pool of bench.py (-D base, -D size),
-- each of author bench_author, picked at random.
\set i random(0, :size - 1)
\set id :base + :i
WITH updated AS (
    UPDATE pgb_post_info
    SET content = 'uuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuu',
        updated_at = now()
    WHERE id = :id AND author = 'bench_author'
    RETURNING id)
INSERT INTO pgb_events (type, post_id, data, next_attempt_at)
SELECT 'post.updated', id,
       jsonb_build_object('post_id', id, 'user_id', 'bench_author',
                          'content', 'uuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuu'),
       NULL
FROM updated;
