-- publish: a new post and its outbox row, one statement (one implicit transaction).
-- The least SQL for a publish's guarantees, on the look-alike tables of service pgb (bench.py makes them with
-- IM-Backend's DDL). bench.py runs: pgbench -n -c64 -j1 -M prepared -T<s> -D n=0 -D run=<k> -f this.
-- A new id each time: per client a counter n, ids above every loaded and pooled id, distinct across runs.
\set n :n + 1
\set id 5000000000000 + :run * 10000000000 + :n * 1024 + :client_id
WITH inserted AS (
    INSERT INTO pgb_post_info (id, content, title, author, extra, created_at, updated_at)
    VALUES (:id, 'zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz',
            'hello', 'bench_author', '{"image": "a.png"}', now(), now()))
INSERT INTO pgb_events (type, post_id, data, next_attempt_at)
VALUES ('post.published', :id,
        jsonb_build_object('post_id', :id::bigint, 'author', 'bench_author', 'title', 'hello',
                           'content', 'zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz',
                           'extra', '{"image": "a.png"}'::jsonb),
        NULL);
